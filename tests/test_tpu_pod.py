"""launch/tpu_pod.sh: syntax, dry run, and the per-worker script run against fake gcloud/curl."""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")


def pod(*args, env=None):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                        env=env)


def test_syntax():
  subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_prints_create_sync_and_ssh_to_every_worker():
  out = pod("--name=k15", "--zone=us-east5-a", "--project=p", "--create", "--accelerator=v5p-64",
            "--spot", "--sync", "--dry_run", "--", "python", "-m", "launch.train",
            "--config=configs/llama3_8b_pod.py", "--workdir=/mnt/runs/a")
  assert out.returncode == 0, out.stderr
  cmds = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
  assert cmds[0] == ("+ gcloud compute tpus tpu-vm create k15 --zone=us-east5-a --project=p "
                     "--accelerator-type=v5p-64 --version=tpu-ubuntu2204-base --spot")
  assert "git ls-files -co --exclude-standard" in cmds[1]
  assert cmds[2].startswith("+ gcloud compute tpus tpu-vm scp ")
  assert "--worker=all" in cmds[2] and "--worker=all" in cmds[3]
  assert r"pip\ install\ -q\ -e" in cmds[3]  # printed shell-quoted
  assert cmds[4].startswith("+ gcloud compute tpus tpu-vm ssh k15 --zone=us-east5-a --project=p "
                            "--worker=all ")
  assert "exec python -m launch.train --config=configs/llama3_8b_pod.py" in out.stdout
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    assert f"export {var}=" in out.stdout
  assert not os.path.exists("/tmp/kimi_jax_k15.tgz")  # a dry run writes nothing


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--", "x"], "--name is required"),
    (["--name=n", "--", "x"], "--zone is required"),
    (["--name=n", "--zone=z"], "no command after --"),
    (["--name=n", "--zone=z", "--bogus", "--", "x"], "unknown option --bogus"),
])
def test_usage_errors(args, message):
  out = pod(*args)
  assert out.returncode == 2 and message in out.stderr


def _fake_bin(path, name, body):
  f = path / name
  f.write_text("#!/usr/bin/env bash\n" + body)
  f.chmod(f.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("endpoints, coordinator", [
    ("w-0:0:10.0.0.2,w-1:1:10.0.0.3,w-2:2:10.0.0.4,w-3:3:10.0.0.5", "10.0.0.2"),  # name:id:ip
    ("t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3", "t1v-n-0"),  # hostnames
])
def test_worker_script_exports_jax_distributed_settings(tmp_path, endpoints, coordinator):
  """A fake gcloud runs each --command locally as one worker would; a fake
  curl answers the metadata queries of worker 2 of a 4-host slice."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_bin(bin_dir, "gcloud", 'for a in "$@"; do case "$a" in --command=*) '
            'exec bash -c "${a#--command=}";; esac; done\n')
  _fake_bin(bin_dir, "curl", f'case "${{@: -1}}" in *worker-network-endpoints) echo -n "{endpoints}";;'
            ' *agent-worker-number) echo -n 2;; *) exit 22;; esac\n')
  repo = tmp_path / "repo"
  repo.mkdir()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  out = pod("--name=k15", "--zone=z", f"--repo_dir={repo}", "--port=9000", "--",
            "bash", "-c", 'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $PWD"',
            env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == f"{coordinator}:9000 4 2 {repo}"
  assert f"worker 2 of 4, coordinator {coordinator}:9000" in out.stdout
