"""Serving benchmark: N LoRA adapters hot-swapped on one base (`tuneoff serve`) against hosting
N merged models, on 127.0.0.1.

    .venv/bin/python benchmarks/serving.py --run /path/to/a/finished/default/run

For N = 1, 4, 16 adapters a server loads the base once and the N adapters on it; requests
spread round-robin over the adapters, each with a prompt from its task's test split (tasks
alternate, so every row of the table answers the same prompts), sent by `--concurrency` clients
at once. Every request generates exactly --max-tokens tokens (min_tokens = max_tokens), so every
configuration does the same work whatever its adapters would answer. Measured: client-side
latency percentiles, throughput (requests and generated tokens per second), batches formed, and
the server's resident memory (VmRSS: once every adapter has served, so the base's memory-mapped
weights are paged in, and again after the load). The 4 adapters are the pipeline's:
{extraction, iso_codes} x {lora, qlora}; N = 16 serves each of them 4 times under distinct names
(copies of the folders: 16 separately loaded adapters of real size).

Against merged models:
- latency: a server of the merged extraction LoRA model (runs/extraction/lora/merged) given
  the same requests as the N = 1 server (which serves that adapter); greedy outputs compared;
  then one request at a time, alternating between the two servers;
- memory: N servers of merged models, one process each (how a team without multi-adapter serving
  hosts N fine-tunes), measured for N = 1 and 4 (the 4 distinct merged models), extrapolated
  for 16 from the measured per-server mean.

Time to switch adapters, from the time to first token of streamed requests sent one at a time
(N = 4 server): the same adapter every time; a different resident adapter every time (PEFT's
adapter_names: no switch work at all); a different adapter that is not resident every time (5
adapters cycled with room for 4: every request evicts one and loads one from disk); and the
server's own adapter load times.

The four servers (N = 1, 4, 16, merged) are up at once and their load rounds interleave
(`--rounds` rounds, each over every server in turn), so on a shared machine each sees the same
background load. Bounded: `--budget-s` (default 480) stops starting new phases once spent; what was skipped is
recorded. Writes benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneoff.serving.server import free_port  # noqa: E402

TASKS, METHODS = ("extraction", "iso_codes"), ("lora", "qlora")
TOKEN = "bench-admin-token"


def memory_of(pid: int) -> dict:
    """The process's resident set now and at its peak, from /proc (Linux), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


class Server:
    """`tuneoff serve` in a subprocess; stopped with SIGTERM."""

    def __init__(self, base: Path, adapters: dict[str, Path], max_adapters: int, args, log_dir: Path, label: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "tuneoff.cli", "serve", "--base", str(base), "--port", str(self.port),
               "--max-adapters", str(max_adapters), "--max-batch-size", str(args.concurrency),
               "--batch-wait-ms", str(args.batch_wait_ms), "--threads", str(args.threads), "--adapter-root", str(log_dir.parent),
               *[f"--adapter={name}={path}" for name, path in adapters.items()]]
        self.log = log_dir / f"{label}.log"
        env = {**os.environ, "TUNEOFF_ADMIN_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.started = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)

    def wait(self) -> float:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def memory(self) -> dict:
        return memory_of(self.proc.pid)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def chat(client: httpx.Client, model: str, messages: list, tokens: int) -> tuple[float, dict]:
    """One request that generates exactly `tokens` tokens (min_tokens = max_tokens: every
    configuration does the same work whatever its adapters would say); its latency and body."""
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": tokens,
                                                         "min_tokens": tokens})
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()


def first_token_seconds(client: httpx.Client, model: str, messages: list, max_tokens: int) -> float:
    """Time from sending a streamed request to its first piece of generated text."""
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json={"model": model, "messages": messages, "stream": True,
                                                             "max_tokens": max_tokens, "min_tokens": max_tokens}) as response:
        response.raise_for_status()
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    first = time.perf_counter() - start
                    break
        else:
            raise RuntimeError(f"{model}: no text streamed")
        for _ in lines:  # read to the end: the next request starts on an idle server
            pass
    return first


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load_round(server: Server, jobs: list[tuple[str, list]], args) -> dict:
    """Send every job (model, messages), `concurrency` at a time: raw latencies, wall time, batches."""
    before = server.client.get("/stats").json()["batches"]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda job: chat(server.client, job[0], job[1], args.max_tokens), jobs))
    wall = time.perf_counter() - start
    after = server.client.get("/stats").json()["batches"]
    return {"latencies": [seconds for seconds, _ in results], "wall": wall,
            "tokens": sum(body["usage"]["completion_tokens"] for _, body in results),
            "batches": after["count"] - before["count"], "mixed": after["mixed_adapters"] - before["mixed_adapters"],
            "texts": [body["choices"][0]["message"]["content"] for _, body in results]}


def summarise(rounds: list[dict], args) -> dict:
    """Latency percentiles over every request of every round; throughput over their summed wall time."""
    latencies = [x for r in rounds for x in r["latencies"]]
    wall, tokens, batches = (sum(r[k] for r in rounds) for k in ("wall", "tokens", "batches"))
    return {"rounds": len(rounds), "requests": len(latencies), "concurrency": args.concurrency,
            "wall_seconds": round(wall, 2),
            "latency_seconds": {"p50": round(percentile(latencies, 50), 3), "p90": round(percentile(latencies, 90), 3),
                                "p99": round(percentile(latencies, 99), 3), "mean": round(statistics.mean(latencies), 3)},
            "requests_per_second": round(len(latencies) / wall, 3), "completion_tokens": tokens,
            "tokens_per_second": round(tokens / wall, 2), "batches": batches,
            "mean_batch_size": round(len(latencies) / batches, 2) if batches else None,
            "mixed_batches": sum(r["mixed"] for r in rounds),
            "requests_per_second_by_round": [round(len(r["latencies"]) / r["wall"], 3) for r in rounds]}


def prompts(run: Path, task: str, count: int) -> list[list[dict]]:
    text = (run / "data" / "prepared" / task / "test.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line]  # not splitlines(): U+2028 may sit in a string
    return [row["messages"][:-1] for row in rows[:count]]


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a project folder after `make run` (read only)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--requests", type=int, default=16, help="requests per load round and server")
    parser.add_argument("--rounds", type=int, default=2, help="load rounds, each over every server in turn")
    parser.add_argument("--concurrency", type=int, default=8, help="clients at once (and the server's batch size)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="the servers' --batch-wait-ms")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    parser.add_argument("--sequential", type=int, default=6, help="requests in each one-at-a-time measurement")
    parser.add_argument("--budget-s", type=float, default=480)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneoff-bench-") as work:  # adapter copies and server logs
        result = measure(args, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serving.md").write_text(table(result))
    print(table(result))


def measure(args, work: Path) -> dict:
    began = time.perf_counter()
    run = args.run.resolve()
    logs = work / "logs"
    logs.mkdir()
    # tasks alternate in this order, and so do the prompts: request i asks in task i % 2
    real = {f"{task}-{method}": run / "runs" / task / method / "model" for method in METHODS for task in TASKS}
    task_of = {name: name.split("-")[0] for name in real}
    copies = {}
    for k in range(4):  # 16 adapters: each real one 4 times, as separate folders under separate names
        for name, path in real.items():
            dest = work / "adapters" / f"{name}-{k}"
            dest.mkdir(parents=True)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(path / f, dest / f)
            copies[f"{name}-{k}"], task_of[f"{name}-{k}"] = dest, task_of[name]
    task_prompts = {task: prompts(run, task, args.requests) for task in TASKS}
    spare = work / "adapters" / "spare"  # a fifth adapter for the cold-switch measurement
    shutil.copytree(copies["iso_codes-lora-0"], spare)

    def jobs_for(names: list[str], count: int) -> list[tuple[str, list]]:
        """Request i: adapter i mod N, a prompt of task i mod 2 (its own task's when N > 1)."""
        return [(names[i % len(names)], task_prompts[TASKS[i % 2]][i // 2 % args.requests]) for i in range(count)]

    def left() -> float:
        return args.budget_s - (time.perf_counter() - began)

    def warm(server: Server, names: list[str]) -> None:
        """Every adapter serves once: all resident, and the base's weights paged in from the file."""
        for i, name in enumerate(names):
            chat(server.client, name, task_prompts[TASKS[i % 2]][0], 4)

    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "loadavg_start": os.getloadavg(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                             for k, v in vars(args).items()},
              "adapters": {name: str(path) for name, path in real.items()},
              "adapter_file_mib": round((real["extraction-lora"] / "adapter_model.safetensors").stat().st_size / 2**20, 2),
              "servers": {}, "skipped": []}
    base = run / "models" / "base"
    merged = {name: path.with_name("merged") for name, path in real.items()}
    # first, N merged models, one server each, all up at once: memory only (a short phase)
    servers = [Server(path, {}, 1, args, logs, f"merged-copy-{name}") for name, path in merged.items()]
    try:
        for server, name in zip(servers, merged):
            server.wait()
            warm(server, ["base"])
        result["merged_servers"] = {"count": len(servers), "models": [str(p) for p in merged.values()],
                                    "rss_mib": [s.memory()["VmRSS"] for s in servers]}
    finally:
        for server in servers:
            server.stop()
    served = {"adapters-1": ["extraction-lora"], "adapters-4": list(real), "adapters-16": list(copies)}
    # all four up at once, their load rounds interleaved: on a shared machine each sees the same
    # background load. merged-1 is the merged extraction LoRA model, given adapters-1's requests.
    servers = {key: Server(base, {name: real.get(name) or copies[name] for name in names}, len(names), args, logs, key)
               for key, names in served.items()}
    servers["merged-1"] = Server(merged["extraction-lora"], {}, 1, args, logs, "merged-1")
    served["merged-1"] = ["base"]
    jobs = {key: jobs_for(names, args.requests) for key, names in served.items()}
    jobs["merged-1"] = [("base", messages) for _, messages in jobs["adapters-1"]]
    try:
        entries = {key: {"startup_seconds": round(server.wait(), 1)} for key, server in servers.items()}
        for key, server in servers.items():
            warm(server, served[key])
            entries[key]["memory_mib"] = server.memory()
        rounds: dict[str, list] = {key: [] for key in servers}
        for r in range(args.rounds):
            if r > 0 and left() < 150:
                result["skipped"].append(f"load rounds {r + 1}-{args.rounds}")
                break
            for key, server in servers.items():
                rounds[key].append(load_round(server, jobs[key], args))
        for key, server in servers.items():
            entries[key]["load"] = summarise(rounds[key], args)
            entries[key]["memory_after_load_mib"] = server.memory()
            entries[key]["adapter_load_seconds"] = server.client.get("/stats").json()["load_seconds"]
        texts = [(a, m) for ra, rm in zip(rounds["adapters-1"], rounds["merged-1"]) for a, m in zip(ra["texts"], rm["texts"])]
        entries["merged-1"]["same_output_as_adapter"] = f"{sum(a == m for a, m in texts)}/{len(texts)}"
        latencies = {"adapter": [], "merged": []}
        for model_name, messages in jobs_for(["extraction-lora"], args.sequential):  # one at a time, alternating
            latencies["adapter"].append(chat(servers["adapters-1"].client, model_name, messages, args.max_tokens)[0])
            latencies["merged"].append(chat(servers["merged-1"].client, "base", messages, args.max_tokens)[0])
        entries["adapters-1"]["sequential_seconds"] = {k: round(statistics.mean(v), 3) for k, v in latencies.items()}
        if left() > 60:
            entries["adapters-4"]["switch"] = switch_phase(servers["adapters-4"], served["adapters-4"], spare,
                                                           task_prompts, args)
        else:
            result["skipped"].append("switch")
        result["servers"] = entries
    finally:
        for server in servers.values():
            server.stop()
    result["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def switch_phase(server: Server, names: list[str], spare: Path, task_prompts: dict, args) -> dict:
    """Time to first token, one streamed request at a time, on one fixed prompt."""
    messages = task_prompts["extraction"][1]
    n = args.sequential
    same = [first_token_seconds(server.client, names[0], messages, 4) for _ in range(n)]
    other = [first_token_seconds(server.client, names[(i + 1) % len(names)], messages, 4) for i in range(n)]
    start = time.perf_counter()
    loaded = server.client.post("/admin/adapters", json={"name": "spare", "path": str(spare)},
                                headers={"Authorization": f"Bearer {TOKEN}"})
    admin_seconds = time.perf_counter() - start
    loaded.raise_for_status()
    before = server.client.get("/stats").json()
    cold = []
    for _ in range(n):  # 5 adapters known, 4 resident: ask for the one that is not
        loaded_now = server.client.get("/stats").json()["resident_adapters"]
        evicted = next(name for name in [*names, "spare"] if name not in loaded_now)
        cold.append(first_token_seconds(server.client, evicted, messages, 4))
    after = server.client.get("/stats").json()
    return {"ttft_same_adapter": round(statistics.median(same), 3),
            "ttft_other_resident_adapter": round(statistics.median(other), 3),
            "ttft_other_adapter_loaded_from_disk": round(statistics.median(cold), 3),
            "cold_requests_that_loaded": after["adapter_loads"] - before["adapter_loads"], "cold_requests": n,
            "admin_load_seconds": round(admin_seconds, 3),
            "server_load_seconds_mean": round(after["load_seconds"]["mean"], 4)}


def table(result: dict) -> str:
    servers, lines = result["servers"], []
    merged = result.get("merged_servers")
    per_merged = statistics.mean(merged["rss_mib"]) if merged else None
    lines += ["| served | RSS MiB (warm / after load) | N merged servers, RSS MiB (warm) | latency s p50 / p90 / p99 | "
              "req/s | tok/s | mean batch | mixed batches |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(servers, key=lambda k: (k.startswith("merged"), int(k.split("-")[1]))):
        entry = servers[key]
        load = entry["load"]
        n = int(key.split("-")[1]) if key.startswith("adapters") else None
        if n is None:
            copies = "-"
        elif merged and n == merged["count"]:
            copies = f"{sum(merged['rss_mib']):,.0f} (measured: {' + '.join(f'{r:,.0f}' for r in merged['rss_mib'])})"
        elif n == 1 and "merged-1" in servers:
            copies = f"{servers['merged-1']['memory_mib']['VmRSS']:,.0f} (measured)"
        elif merged:
            copies = f"{n * per_merged:,.0f} (extrapolated: {n} x {per_merged:,.0f})"
        else:
            copies = "not measured"
        label = f"{n} adapter{'s' if n > 1 else ''} on one base" if n else "1 merged model (extraction-lora)"
        lat = load["latency_seconds"]
        lines.append(f"| {label} | {entry['memory_mib']['VmRSS']:,.0f} / {entry['memory_after_load_mib']['VmRSS']:,.0f} | "
                     f"{copies} | {lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} | "
                     f"{load['requests_per_second']:.2f} | {load['tokens_per_second']:.1f} | {load['mean_batch_size']} | "
                     f"{load['mixed_batches']} of {load['batches']} |")
    s = result["settings"]
    lines += ["", f"Each row: {s['rounds']} rounds of {s['requests']} chat requests, {s['concurrency']} clients at once, "
                  f"the four servers up together and their rounds interleaved; each request generates exactly "
                  f"{s['max_tokens']} tokens (min_tokens = max_tokens), prompts alternating between the two tasks; "
                  f"server batch size {s['concurrency']}, batch wait {s['batch_wait_ms']:g} ms, {s['threads']} torch thread(s). "
                  f"An adapter file is {result['adapter_file_mib']} MiB."]
    if "adapters-1" in servers and "merged-1" in servers:
        a, m = servers["adapters-1"], servers["merged-1"]
        lines.append(f"One request at a time (mean of {s['sequential']}, interleaved): adapter "
                     f"{a['sequential_seconds']['adapter']:.2f} s, merged model {a['sequential_seconds']['merged']:.2f} s. "
                     f"Greedy outputs identical to the adapter's: {m['same_output_as_adapter']}.")
    switch = servers.get("adapters-4", {}).get("switch")
    if switch:
        lines.append(f"Switching (N=4, time to first token, median of {switch['cold_requests']}): same adapter each time "
                     f"{switch['ttft_same_adapter']:.3f} s; another resident adapter each time "
                     f"{switch['ttft_other_resident_adapter']:.3f} s; another adapter loaded from disk each time (5 cycled "
                     f"with room for 4; {switch['cold_requests_that_loaded']}/{switch['cold_requests']} loaded) "
                     f"{switch['ttft_other_adapter_loaded_from_disk']:.3f} s; the server's adapter load "
                     f"{switch['server_load_seconds_mean'] * 1000:.0f} ms mean; an admin load call "
                     f"{switch['admin_load_seconds'] * 1000:.0f} ms.")
    m = result["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}; load average "
                 f"{result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at end (shared machine); "
                 f"{result['seconds']:.0f} s. Command: `{result['command']}`."
                 + (f" Skipped (time budget): {', '.join(result['skipped'])}." if result["skipped"] else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
