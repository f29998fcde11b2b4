"""A real one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd in a folder.

  with SlurmCluster(tmp_dir, cpus=2) as cluster:
    subprocess.run(["sbatch", "--wait", ...], env=cluster.env())

Everything the daemons write (munge key and socket, slurm.conf, state, spool, logs) is under the
folder; clients and daemons find the config through `SLURM_CONF`, so a system-wide Slurm or munge
is neither needed nor touched. `SlurmCluster.start` raises `Unavailable` (saying why, with the
daemons' log tails) where Slurm cannot run: binaries missing, a daemon that does not come up.
"""
import os
import shutil
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")


class Unavailable(RuntimeError):
  """Slurm cannot run here; the message says why."""


def _free_ports(n: int) -> list:
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def _which(name: str) -> str | None:
  return shutil.which(name) or next(
      (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def _tail(path: str, n: int = 2000) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read()[-n:]
  except OSError:
    return "(no log)"


def _alive(pid: int) -> bool:
  """Running (a zombie, which an init that does not reap leaves behind, has ended)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return False


class SlurmCluster:
  """One node named `localhost` with `cpus` CPUs in partition `debug`; root runs every job."""

  def __init__(self, root: str, cpus: int = 2):
    self.root, self.cpus = os.path.abspath(root), cpus
    self.conf = os.path.join(self.root, "slurm.conf")
    self.socket = os.path.join(self.root, "socket", "munge.socket")
    self.logs = {d: os.path.join(self.root, "log", f"{d}.log") for d in DAEMONS}
    self._pid_files = {d: os.path.join(self.root, "run", f"{d}.pid") for d in DAEMONS}
    self.started = []

  def env(self, **extra) -> dict:
    """The environment for Slurm clients (and the jobs they submit) of this cluster: this
    process's, less any SLURM_* of an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(env, SLURM_CONF=self.conf, **extra)

  def _why(self, what: str) -> Unavailable:
    logs = "\n".join(f"--- {d} log:\n{_tail(self.logs[d])}" for d in self.started)
    return Unavailable(f"{what}\n{logs}")

  def _run(self, cmd: list, what: str):
    try:
      p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise self._why(f"{what}: {e}") from e
    if p.returncode:
      raise self._why(f"{what}: {' '.join(cmd)} exited with {p.returncode}: {p.stderr.strip()}")
    return p

  def start(self, timeout: float = 60) -> "SlurmCluster":
    if os.geteuid() != 0:
      raise Unavailable("the test Slurm cluster runs its daemons as root; this is not root")
    missing = [b for b in DAEMONS + CLIENTS + ("mungekey",) if _which(b) is None]
    if missing:
      raise Unavailable(f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd "
                        "slurm-client munge)")
    for d in ("munge", "log", "run", "state", "spool"):
      os.makedirs(os.path.join(self.root, d), mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(self.socket), mode=0o755, exist_ok=True)
    os.chmod(self.root, 0o755)
    key = os.path.join(self.root, "munge", "munge.key")
    self._run([_which("mungekey"), "--create", "--force", f"--keyfile={key}"], "mungekey")
    self.started.append("munged")
    self._run([_which("munged"), f"--socket={self.socket}", f"--key-file={key}",
               f"--log-file={self.logs['munged']}", f"--pid-file={self._pid_files['munged']}",
               f"--seed-file={os.path.join(self.root, 'munge', 'seed')}"], "munged")
    ctld_port, d_port = _free_ports(2)
    with open(self.conf, "w", encoding="utf-8") as f:
      f.write(self._config(ctld_port, d_port))
    self.started.append("slurmctld")
    self._run([_which("slurmctld"), "-i", "-f", self.conf], "slurmctld")
    self.started.append("slurmd")
    self._run([_which("slurmd"), "-N", "localhost", "-f", self.conf], "slurmd")
    t = time.time()
    while True:  # the node registers with the controller: idle
      p = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], env=self.env(),
                         capture_output=True, text=True, check=False)
      if p.returncode == 0 and p.stdout.strip() == "idle":
        return self
      if time.time() - t > timeout:
        raise self._why(f"the node is not idle after {timeout:.0f} s (sinfo: "
                        f"{(p.stdout + p.stderr).strip()!r})")
      time.sleep(0.2)

  def _config(self, ctld_port: int, d_port: int) -> str:
    r = self.root
    return f"""\
ClusterName=onenip-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self._pid_files['slurmctld']}
SlurmdPidFile={self._pid_files['slurmd']}
SlurmctldLogFile={self.logs['slurmctld']}
SlurmdLogFile={self.logs['slurmd']}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

  def stop(self) -> None:
    """Cancels every job and ends the daemons this cluster started (by their pid files)."""
    if "slurmctld" in self.started:
      subprocess.run([_which("scancel"), "--user=root", "--full"], env=self.env(),
                     capture_output=True, check=False, timeout=30)
    for d in reversed(self.started):
      try:
        with open(self._pid_files[d], encoding="utf-8") as f:
          pid = int(f.read().split()[0])
        os.kill(pid, 15)
      except (OSError, ValueError, IndexError):
        continue
      t = time.time()
      while time.time() - t < 10 and _alive(pid):
        time.sleep(0.1)
    self.started = []

  def __enter__(self) -> "SlurmCluster":
    try:
      return self.start()
    except BaseException:
      self.stop()
      raise

  def __exit__(self, *exc) -> None:
    self.stop()
