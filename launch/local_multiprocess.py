r"""Starts N local CPU processes that train together through `jax.distributed` on 127.0.0.1.

  python -m launch.local_multiprocess --num-processes 2 -- \
      --config configs/real.py:steps=5 --workdir /tmp/onenip-2proc

For testing multi-process code paths (per-process data shards, global arrays, collectives) on one
machine. Each process gets one CPU device, JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID in its environment, runs `python -m onenip_jax.cli train ARGS` (see --module and
--command), and writes its log to <workdir>/process_<i>.log. The launcher
prints each process's pid, passes a SIGTERM it receives on to every process (as a scheduler's
preemption would reach every host), waits through Ctrl-C (the terminal sends SIGINT to every
process itself) and returns the exit code farthest from 0.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--module", default="onenip_jax.cli", help="python module to run")
  parser.add_argument("--command", default="train",
                      help="the module's first argument (the `onenip_jax.cli` command); '' for none")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments after -- go to the module")
  a = parser.parse_args(argv)
  args = a.args[1:] if a.args[:1] == ["--"] else a.args
  workdir = next((x.split("=", 1)[1] for x in args if x.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in args:
    workdir = args[args.index("--workdir") + 1]
  log_dir = workdir or "."
  os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{free_port()}"
  procs = []
  for i in range(a.num_processes):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(a.num_processes),
               JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w", encoding="utf-8")
    cmd = [sys.executable, "-m", a.module, *([a.command] if a.command else []), *args]
    procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    print(f"process {i}: pid {procs[-1][0].pid}", flush=True)

  def forward(signum, frame):
    del frame
    for p, _ in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, lambda *_: None)  # a second SIGINT would abort the processes
  rcs = []
  for p, log in procs:
    rcs.append(p.wait())
    log.close()
  for i, rc in enumerate(rcs):
    print(f"process {i}: exit code {rc} (log {os.path.join(log_dir, f'process_{i}.log')})")
  return max(rcs, key=abs)


if __name__ == "__main__":
  sys.exit(main())
