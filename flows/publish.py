"""What a bake-off leaves for the team: a git commit of the run's records, its outputs on the DVC
remote, and its registered versions and stages as GTO tags on that commit.

    python -m flows.publish [--push]      (`tuneoff publish`; the bake-off flow does this itself)

1. commit: dvc.lock, the metrics and plots, reports/ and registry/ (only those paths, whatever
   else is staged), as "tuneoff bake-off: <task>: <verdict> ...";
2. `dvc push` when the project has a default DVC remote, so every output of that commit (the
   production models included) can be pulled elsewhere;
3. each version registry/decision.json says register added becomes a GTO version of `<task>-model`
   on that commit (`<task>-model@v<N>.0.0`, N the registry's version) and is assigned its stage
   (`production` or `staging`); a production version it replaced loses that stage (GTO deprecates
   the assignment). `gto show`, `dvc artifacts get <repo> <task>-model --stage production` and DVC
   Studio read these tags;
4. with a DVC remote, a `publish@<task>` W&B run per version tagged now: the model as an artifact
   whose large files are references to the remote's URLs;
5. with `--push` (params `publish.push`), the branch and the new tags to `publish.git_remote`;
6. with `publish.hub_repo`, each newly promoted model (its model card included) to the Hugging Face Hub.

registry/registry.json stays the record of each version's lineage (what the register stage judges
against); the tags are written from it, on the commit that holds it, and checked against it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
from pathlib import Path

from flows.shell import sh
from tuneoff.core.errors import TuneoffError, user_errors
from tuneoff.core.params import PublishParams, section

RECORDS = ["dvc.lock", "dvc.yaml", "params.yaml", "reports", "registry", "runs", "models/quantize.json"]
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "tuneoff", "GIT_AUTHOR_EMAIL": "tuneoff@localhost",
                     "GIT_COMMITTER_NAME": "tuneoff", "GIT_COMMITTER_EMAIL": "tuneoff@localhost"}


def git(*args: str) -> str:
    return sh("git", *args, env=identity())


@functools.cache
def identity() -> dict[str, str]:
    """FALLBACK_IDENTITY when git has no committer name and e-mail here (a fresh machine often has
    neither, and GTO cannot tag without them); else nothing to add."""
    configured = [subprocess.run(["git", "config", key], capture_output=True, text=True).stdout.strip()
                  for key in ("user.name", "user.email")]
    given = all(configured) or all(os.environ.get(k) for k in ("GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"))
    return {} if given else FALLBACK_IDENTITY


def in_git_repo() -> bool:
    return subprocess.run(["git", "rev-parse", "--git-dir"], capture_output=True).returncode == 0


def version_tag(version: int) -> str:
    """GTO versions are semver: registry version 3 is v3.0.0."""
    return f"v{version}.0.0"


def commit_message(decisions: dict) -> str:
    lines = [f"{task}: {d['verdict']}" + (f", {d['method']}" if d.get("method") else "")
             + (f" -> v{d['registered']['version']} {d['registered']['stage']}" if d.get("registered") else "")
             for task, d in sorted(decisions.items())]
    return "tuneoff bake-off: " + "; ".join(lines) + "\n\nRecords of a bake-off run (dvc.lock, metrics, report, registry)."


def commit(decisions: dict) -> str | None:
    """Commit the run's records (only RECORDS, whatever else is staged); the new commit, or None
    when nothing changed."""
    paths = [p for p in RECORDS if Path(p).exists()]
    git("add", "--", *paths)
    if not git("diff", "--cached", "--name-only", "--", *paths).strip():
        return None
    git("commit", "--quiet", "-m", commit_message(decisions), "--", *paths)
    return git("rev-parse", "HEAD").strip()


def gto(*args: str) -> str:
    return sh("gto", *args, env=identity())


def tag_versions(decisions: dict, registry: dict, ref: str) -> list[str]:
    """GTO tags for the versions registered in this run, and the production assignment taken from
    the version each replaced; a rerun adds nothing. The versions tagged."""
    tagged, done = gto_stages(), []
    for task, decision in sorted(decisions.items()):
        registered = decision.get("registered")
        if not registered:
            continue
        name, number = registered["name"], registered["version"]
        version = next(v for v in registry["models"][name] if v["version"] == number)
        tag = version_tag(number)
        if tag not in tagged.get(name, {}):
            gto("register", name, ref, "--version", tag, "-m", f"{version['method']}: {version['reason']}")
            gto("assign", name, "--version", tag, "--stage", version["stage"], "-m", version["reason"])
            done.append(promoted_line(registered) if version["stage"] == "production" else f"{name} {tag} {version['stage']}")
        for old in registry["models"][name]:
            if old["stage"] == "archived" and tagged.get(name, {}).get(version_tag(old["version"])) == "production":
                gto("deprecate", name, version_tag(old["version"]), "production")
                done.append(f"{name} {version_tag(old['version'])} archived")
    return done


def promoted_line(registered: dict) -> str:
    return f"{registered['name']} {version_tag(registered['version'])} production"


def gto_stages() -> dict[str, dict[str, str]]:
    """{artifact: {version: its active stage, "" for none}}, as GTO reads the tags."""
    out: dict[str, dict[str, str]] = {}
    for name in json.loads(sh("gto", "show", "--json") or "{}"):
        rows = json.loads(sh("gto", "show", name, "--json", "--vs", "-1", "--av", "-1") or "[]")
        out[name] = {row["version"]: next((s["stage"] for s in row["stages"] if s["is_active"]), "") for row in rows}
    return out


def check_agrees(registry: dict) -> None:
    """GTO's stage of each version is the registry's (archived: none)."""
    tagged = gto_stages()
    for name, versions in registry["models"].items():
        for v in versions:
            shown = tagged.get(name, {}).get(version_tag(v["version"]))
            if shown is not None and shown != ("" if v["stage"] == "archived" else v["stage"]):
                raise TuneoffError(f"GTO shows {name} {version_tag(v['version'])} in stage {shown or 'none'!r}, "
                                   f"registry/registry.json in {v['stage']!r}: were the tags changed by hand?")


def dvc_remote() -> str | None:
    """The project's default DVC remote, if it has one."""
    proc = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None  # none: exit 1, "No default remote set"


def switch_to(branch: str) -> None:
    """Work on `branch`, made afresh from the checked-out commit when this workspace is not on it
    already (the working tree comes along): the retrain branch is tuneoff's, as a bot's pull-request
    branch is the bot's."""
    if git("rev-parse", "--abbrev-ref", "HEAD").strip() != branch:
        git("checkout", "--quiet", "-B", branch)


def has_remote(name: str) -> bool:
    return subprocess.run(["git", "remote", "get-url", name], capture_output=True).returncode == 0


def publish(push: bool | None = None, branch: str | None = None) -> dict:
    """Steps 1-6 above; what was done, for the flow's log and result. `branch` (the retrain's) is
    pushed with force: each retrain rebuilds it."""
    params = section(PublishParams, "publish")
    push = params.push if push is None else push
    if not params.commit or not in_git_repo():
        print("publish: " + ("publish.commit is false" if params.commit is False else "not a git repository")
              + ": nothing committed or tagged")
        return {"commit": None}
    decisions = json.loads(Path("registry/decision.json").read_text()) if Path("registry/decision.json").is_file() else {}
    registry_file = Path("registry/registry.json")
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else {"models": {}}
    done = {"commit": commit(decisions)}
    print(f"publish: committed {done['commit'][:12]}" if done["commit"] else "publish: no new records to commit")
    remote = dvc_remote()
    if remote:
        sh("dvc", "push", "--quiet")
        print(f"publish: outputs pushed to DVC remote {remote!r}")
    done["tags"] = tag_versions(decisions, registry, "HEAD")
    check_agrees(registry)
    for line in done["tags"]:
        print(f"publish: GTO {line}")
    if remote:
        record_in_wandb(decisions, registry, done["tags"], remote)
    if push and not has_remote(params.git_remote):
        print(f"publish: no git remote {params.git_remote!r} (publish.git_remote): nothing pushed")
    elif push:
        target = branch or git("rev-parse", "--abbrev-ref", "HEAD").strip()
        git("push", "--quiet", params.git_remote, f"{'+' if branch else ''}HEAD:refs/heads/{target}")
        git("push", "--quiet", params.git_remote, "--tags")
        done["pushed"] = f"{params.git_remote} {target}"
        print(f"publish: pushed {target} and the tags to {params.git_remote}")
    if params.hub_repo:
        done["hub"] = hub_push(params.hub_repo, {t: d for t, d in decisions.items() if d.get("registered") and
                                                 promoted_line(d["registered"]) in done["tags"]})
    return done


def remote_urls(folder: Path) -> dict[str, str]:
    """{file in folder: where the DVC remote holds it} (a local-folder remote's paths as file:// URIs)."""
    import dvc.api

    urls = {f.relative_to(folder).as_posix(): dvc.api.get_url(str(f), repo=".")
            for f in sorted(folder.rglob("*")) if f.is_file()}
    return {rel: url if "://" in url else Path(url).resolve().as_uri() for rel, url in urls.items()}


def record_in_wandb(decisions: dict, registry: dict, tagged: list[str], remote: str) -> None:
    """A `publish@<task>` W&B run for each version tagged now: the model as an artifact aliased with
    its GTO version and stage, whose large files are references to the DVC remote (a reviewer with
    access to the remote can fetch them; the register stage's own artifact points at this disk)."""
    from tuneoff.core.tracking import stage_run

    commit = git("rev-parse", "HEAD").strip()
    for task, d in sorted(decisions.items()):
        registered = d.get("registered")
        if not registered or not any(line.startswith(f"{registered['name']} {version_tag(registered['version'])} ")
                                     for line in tagged):
            continue
        version = next(v for v in registry["models"][registered["name"]] if v["version"] == registered["version"])
        folder = Path(registered.get("published") or version["path"])
        with stage_run("publish", {"publish": {"dvc_remote": remote}}, task=task, method=version["method"]) as tracker:
            tracker.artifact(registered["name"], "model", folder,
                             {"version": version_tag(version["version"]), "stage": version["stage"], "commit": commit,
                              "dvc_remote": remote, "reason": version["reason"]},
                             aliases=(version_tag(version["version"]), version["stage"]), urls=remote_urls(folder))


def hub_push(repo_pattern: str, decisions: dict) -> list[str]:
    """Each production model promoted in this run (tagged now, not on a rerun) to the Hugging Face Hub repo `repo_pattern`
    ({task} is the task's name), private, with its model card; credentials as huggingface_hub
    finds them (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    api, pushed = HfApi(), []
    for task, d in sorted(decisions.items()):
        registered = d.get("registered") or {}
        if registered.get("stage") != "production":
            continue
        repo_id = repo_pattern.format(task=task)
        try:
            api.create_repo(repo_id, private=True, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=registered["published"],
                              commit_message=f"{registered['name']} v{registered['version']} (tuneoff)")
        except Exception as e:
            raise TuneoffError(f"publish.hub_repo {repo_pattern!r}: pushing {registered['published']} to {repo_id} "
                               f"failed: {str(e).splitlines()[0]}") from None
        pushed.append(repo_id)
        print(f"publish: {registered['published']} pushed to https://huggingface.co/{repo_id}")
    return pushed


@user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--push", action="store_true", help="also push the branch and tags (default: params publish.push)")
    args = parser.parse_args(argv)
    publish(push=args.push or None)


if __name__ == "__main__":
    main()
