"""Multi-host training on one machine: 2 processes × 2 CPU devices (gloo collectives).

Every run uses 2 logical data shards (config.data.num_shards=2), so the single-process
4-device run and the 2-process run see identical global batches and must end with the same
parameters; a 2-process run killed with SIGKILL mid-run and restarted resumes to the same
final parameters as an uninterrupted one.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from matquant_jax.checkpoints import _common

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 4
CKPT_EVERY = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "matquant_jax.train", "--config=configs/tiny_qat.py",
          f"--workdir={workdir}", f"--config.num_steps={STEPS}", "--config.data.seq_len=32",
          "--config.data.global_batch_size=8", "--config.data.num_shards=2",
          "--config.mesh.fsdp=2", f"--config.log_every_steps={CKPT_EVERY}",
          f"--config.checkpoint_every_steps={CKPT_EVERY}", "--config.optimizer.warmup_steps=2",
          *extra]


def _env(devices: int):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       + os.environ["MATQUANT_TEST_CPU_FLAGS"])  # fast compiles (conftest)
  return env


def _start_pod(workdir, *extra):
  port = _free_port()
  return [subprocess.Popen(
      _cmd(workdir, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}", *extra),
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _wait(procs, timeout=240):
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _params(workdir):
  import jax
  import orbax.checkpoint as ocp
  from matquant_jax.models import get_config, transformer
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                                  transformer.param_shapes(get_config("tiny_gemma2")))
  tree = ocp.StandardCheckpointer().restore(
      (pathlib.Path(workdir) / "final_params").absolute(), target)
  return {k: np.asarray(v) for k, v in _common.flatten_tree(tree).items()}


def _export(workdir):
  import warnings
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ckpt = MatQuantCheckpoint.load(pathlib.Path(workdir) / "matquant_int8")  # checksums verified
  assert not [w for w in caught if "checksums" in str(w.message)], caught
  out = {f"{k}/{f}": np.asarray(getattr(q, f)) for k, q in ckpt.qtensors.items()
         for f in ("codes", "scale", "zero")}
  out.update({k: np.asarray(v) for k, v in ckpt.floats.items()})
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  # The single-process reference and the uninterrupted pod run, side by side.
  single = subprocess.Popen(_cmd(root / "single"), cwd=REPO, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  pod = _start_pod(root / "pod")
  _wait([single] + pod)
  return root


def test_two_processes_match_one_process(runs):
  single, pod = _params(runs / "single"), _params(runs / "pod")
  assert sorted(single) == sorted(pod)
  for k in single:
    np.testing.assert_allclose(pod[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # The int8 export written by both processes equals the single-process one (codes may move
  # by one where the float params differ in their last bits).
  a, b = _export(runs / "single"), _export(runs / "pod")
  for k in a:
    if k.endswith("codes"):
      diff = np.abs(a[k].astype(int) - b[k].astype(int))
      assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, k
    else:
      np.testing.assert_allclose(np.asarray(b[k], np.float32), np.asarray(a[k], np.float32),
                                 rtol=1e-2, atol=1e-6, err_msg=k)
  # The pod's export has a checksum for every array: per-shard digests where the arrays are
  # sharded across devices of the pod, merged by process 0 (no part files left behind).
  import json
  sums = [json.loads((runs / w / "matquant_int8" / "metadata.json").read_text())["checksums"]
          for w in ("single", "pod")]
  assert sums[0] and sorted(sums[0]) == sorted(sums[1])
  assert any(isinstance(v, list) for v in sums[1].values())
  assert not list((runs / "pod" / "matquant_int8").glob("checksums.*.json"))
  # Both processes checkpointed: the merged data state holds both logical shards.
  step_dirs = sorted((runs / "pod" / "checkpoints").glob("[0-9]*"))
  data = json.loads((step_dirs[-1] / "data" / "metadata").read_text())
  assert sorted(data) == ["0", "1"]


def test_sigkill_both_processes_and_resume(runs):
  work = runs / "killed"
  procs = _start_pod(work)
  try:
    deadline = time.time() + 300
    # Kill as soon as the first checkpoint is committed (Orbax renames it into place).
    while not (work / "checkpoints" / str(CKPT_EVERY)).is_dir():
      assert time.time() < deadline and all(p.poll() is None for p in procs), (
          [p.communicate()[0][-3000:] for p in procs if p.poll() is not None])
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
      p.wait()
  assert not (work / "final_params").exists()
  outs = _wait(_start_pod(work))
  assert any("resumed from" in o for o in outs), outs[0][-2000:]
  resumed, pod = _params(work), _params(runs / "pod")
  for k in pod:
    np.testing.assert_array_equal(resumed[k], pod[k], err_msg=k)


def test_calibrate_refuses_a_multi_process_environment(tmp_path, monkeypatch, capsys):
  from matquant_jax import calibrate  # its own FlagValues: runs in this process
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  code = calibrate.main([f"--config={REPO / 'configs' / 'tiny_omniquant.py'}",
                         f"--workdir={tmp_path / 'w'}"])
  err = capsys.readouterr().err
  assert code == 2 and "calibration runs as one process" in err
  assert "Traceback" not in err and not (tmp_path / "w").exists()
