"""What the hardware reports: the last-level cache size from sysfs; CPU threads fitted to the machine's load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from scratchgpt import device
from scratchgpt.device import (
    choose_threads,
    keep_freed_memory,
    last_level_cache_bytes,
    other_runnable_threads,
)


def _cache(root: Path, index: int, *, level: int, kind: str, size: str) -> None:
    d = root / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_last_level_cache_is_the_highest_data_level(tmp_path: Path) -> None:
    _cache(tmp_path, 0, level=1, kind="Data", size="48K")
    _cache(tmp_path, 1, level=1, kind="Instruction", size="32K")
    _cache(tmp_path, 2, level=2, kind="Unified", size="2048K")
    _cache(tmp_path, 3, level=3, kind="Unified", size="266240K")  # a 260 MB Xeon L3
    assert last_level_cache_bytes(tmp_path) == 266240 * 1024
    _cache(tmp_path, 4, level=4, kind="Instruction", size="1G")  # not a data cache: ignored
    assert last_level_cache_bytes(tmp_path) == 266240 * 1024


def test_last_level_cache_unknown_is_none(tmp_path: Path) -> None:
    assert last_level_cache_bytes(tmp_path / "missing") is None
    _cache(tmp_path, 0, level=2, kind="Unified", size="lots")
    assert last_level_cache_bytes(tmp_path) is None
    _cache(tmp_path, 1, level=3, kind="Unified", size="32M")
    assert last_level_cache_bytes(tmp_path) == 32 << 20


def test_threads_leave_busy_cores_to_other_work_only_under_heavy_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    quiet = choose_threads(others=0, cpus=2)
    assert quiet.threads == 2 and not quiet.busy
    # A light load keeps the count (results do not depend on what else runs); the waiting policy copes.
    assert choose_threads(others=1, cpus=2).threads == 2
    heavy = choose_threads(others=2, cpus=2)  # e.g. two busy processes on two cores
    assert heavy.threads == 1 and heavy.busy and "2 threads of other processes" in heavy.reason
    assert choose_threads(others=7, cpus=2).threads == 1  # never fewer than one
    # The kernel did not say (not Linux): every usable core. (others=None alone would measure this machine.)
    monkeypatch.setattr(device, "other_runnable_threads", lambda: None)
    assert choose_threads(cpus=2).threads == 2
    # An affinity mask of 2 CPUs on a 16-CPU machine with 3 other busy threads: both of ours still run.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert choose_threads(others=3, cpus=2).threads == 2


def test_a_thread_count_given_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_threads(3, others=9, cpus=2).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = choose_threads(others=0, cpus=2)
    assert choice.threads == 1 and "OMP_NUM_THREADS" in choice.reason and not choice.busy


def _cpu_seconds(pid: int, ticks: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc/stat")
def test_busy_loops_are_counted_and_our_own_threads_are_not() -> None:
    assert other_runnable_threads() is not None
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        import time

        # Wait until both loops really spin (a started interpreter may still wait on disk reads, and on a
        # busy machine start-up takes longer than any fixed sleep): each has burned >= 0.1 s of CPU.
        ticks = os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_cpu_seconds(p.pid, ticks) >= 0.1 for p in loops):
            time.sleep(0.05)
        assert other_runnable_threads() >= 2  # both loops are always runnable
    finally:
        for p in loops:
            p.kill()
            p.wait()


def test_idle_threads_sleep_on_a_busy_machine_and_spin_briefly_on_a_quiet_one() -> None:
    from scratchgpt.cli import openmp_waiting

    assert openmp_waiting(2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_waiting(0) == openmp_waiting(None) == {"GOMP_SPINCOUNT": "30000"}


def test_the_cli_chooses_before_torch_loads_and_keeps_a_users_choice() -> None:
    code = ("import os, sys; from scratchgpt.cli import _set_openmp_waiting; _set_openmp_waiting(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[-1] == "False" and out.split()[:2] in (["PASSIVE", "None"], ["None", "30000"]), out
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "OMP_WAIT_POLICY": "ACTIVE"}).stdout
    assert kept.split() == ["ACTIVE", "None", "False"]


_FAULTS_PER_STEP = """
import resource, sys
from scratchgpt.device import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch
from scratchgpt.config import GPTConfig
from scratchgpt.model.gpt import GPT
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=66, n_positions=64, n_layer=4, n_head=4, n_embd=128, bias=False))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 66, (12, 64))
def step():  # nanoGPT's CPU recipe: 4 x 128, batch 12 x 64
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_memory_is_kept_for_reuse_instead_of_faulted_in_again() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    runs = {mode: subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], capture_output=True, text=True,
                                 env=env, check=True).stdout.split() for mode in ("default", "keep")}
    assert runs["keep"][0] == "True" and runs["default"][0] == "False"
    # By default a training step's freed activations go back to the kernel and are faulted in again
    # (~1,450 faults per step measured on an AMD EPYC); kept, the next step reuses them (4 faults alone, ~90
    # beside a busy machine's other processes: still a small fraction).
    faults = {mode: float(out[1]) for mode, out in runs.items()}
    assert faults["default"] > 200 and faults["keep"] < faults["default"] / 4, runs


def test_a_users_malloc_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert keep_freed_memory() is False


def test_threads_left_to_others_lowers_and_restores_the_count() -> None:
    import torch

    from scratchgpt.device import threads_left_to_others

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with threads_left_to_others(1):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        with threads_left_to_others(5):  # never below one
            assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), threads_left_to_others(2):
            raise RuntimeError("the block failed")
        assert torch.get_num_threads() == 3  # restored on the way out of an error too
        with threads_left_to_others(0):
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
