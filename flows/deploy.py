"""Register the flows with a Prefect server: the per-unit flow in each GPU work pool, and the
scheduled retrain flow (cron from params.yaml's `retrain` section).

    python -m flows.deploy --gpu-pool gpu --cpu-pool cpu [--source https://git.example.com/team/repo.git]
    prefect worker start --pool gpu        # on each GPU machine (infra/ has the Kubernetes version)

With a process or Kubernetes pool the flow code comes from `--source` (a git URL, or this
folder for a local process worker); an image-based pool can instead set `--image`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.bakeoff import UNIT_DEPLOYMENT, bakeoff_unit
from flows.retrain import retrain
from tuneoff.core.params import RetrainParams, read_params, section


def deploy(gpu_pool: str, cpu_pool: str, source: str, image: str | None = None) -> list:
    params = section(RetrainParams, "retrain", data=read_params())
    ids = []
    common = {"build": False, "push": False, **({"image": image} if image else {})}
    unit = bakeoff_unit if image else bakeoff_unit.from_source(source, "flows/bakeoff.py:bakeoff_unit")
    # `prefect flow-run execute` supervises the run: on SIGTERM (preemption, node drain) it hands
    # the run back to the pool as Scheduled instead of leaving it Running on a dead machine
    preemptible = {"command": "prefect flow-run execute",
                   "env": {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule"}}
    ids.append(unit.deploy(name=gpu_pool, work_pool_name=gpu_pool, job_variables=preemptible,
                           print_next_steps=False, **common))
    scheduled = retrain if image else retrain.from_source(source, "flows/retrain.py:retrain")
    ids.append(scheduled.deploy(name="scheduled", work_pool_name=cpu_pool, cron=params.cron,
                                parameters={"scope": params.scope, "gpu_pool": params.gpu_pool or gpu_pool},
                                print_next_steps=False, **common))
    print(f"deployed {UNIT_DEPLOYMENT}/{gpu_pool} and retrain/scheduled (cron {params.cron!r}) on {cpu_pool}")
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-pool", required=True)
    parser.add_argument("--cpu-pool", required=True)
    parser.add_argument("--source", default=str(Path.cwd()), help="git URL or folder the workers load the flows from")
    parser.add_argument("--image", help="container image holding the project (image-based pools)")
    args = parser.parse_args(argv)
    deploy(args.gpu_pool, args.cpu_pool, args.source, args.image)


if __name__ == "__main__":
    main()
