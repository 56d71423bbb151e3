"""Seeding, device choice, peak-memory measurement and runs in fresh processes."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so a run repeats exactly; returns ``seed``.

    Defined in: "How a chapter is built" (``book/chapter_template.ipynb``).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed


def choose_device(prefer: str | None = None) -> torch.device:
    """CUDA if available, else CPU; ``prefer`` (e.g. ``"cpu"``) or ``$ADLIB_DEVICE`` overrides.

    Defined in: "Reconstruction: AE, VAE and GANomaly" (``notebooks/03_reconstruction.ipynb``).
    """
    name = prefer or os.environ.get("ADLIB_DEVICE")
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Device {name!r} was requested but CUDA is not available here; use 'cpu'.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")



@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run the ``with`` block, then give the caller back its global random state (Python, NumPy, torch on CPU
    and CUDA): a function that seeds inside (``training.loop.fit`` does) leaves the caller's draws unchanged.

    Used by: ``adlib.methods.autoencoder.AutoencoderDetector``.
    """
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class PeakMemory:
    """Peak memory (MB) while the ``with`` block runs: the process's resident set on CPU (sampled every 5 ms,
    so it includes the Python process itself; where ``/proc`` is missing, e.g. macOS, the process's peak since
    it started), allocated CUDA memory on a GPU.

    Used by: ``adlib.bench.runs.run_category``, ``adlib.eval.protocol.evaluate``.
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        """The process's resident memory now, MB (its peak so far where ``/proc`` is missing)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except OSError:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
            return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_mb = self.rss_mb()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


def in_fresh_processes(fn: Callable[..., T], calls: Sequence[dict[str, Any]], n_jobs: int = 1,
                       threads: int = 1, preload: Sequence[str] = ()) -> Iterator[T]:
    """``fn(**kwargs)`` for each ``kwargs`` of ``calls``, each in a new process that has run nothing else, ``n_jobs``
    at a time on ``threads`` torch threads each; yields the results in call order, re-raises a call's error.

    A process that ran an earlier call keeps the memory it freed, so the next call's peak barely rises: a new
    process per call makes the memory a call adds its own. The processes are forked from a server that has only
    imported ``fn``'s module, the modules in ``preload``, this one and the main script (multiprocessing's
    "forkserver", so no call pays for those imports; "spawn" where the platform has no fork server). The server
    starts at a process's first call and keeps its imports: a later call with another ``fn`` imports what is
    missing in each new process. On an error or Ctrl-C the calls not yet started are cancelled, and the processes
    already started are waited for.

    Used by: ``adlib.bench.benchmark.sweep``, ``adlib.bench.folders.run``.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # imported once, in the server: a script's main module, torch (for the initializer), fn's module and what
        # fn imports when it runs
        context.set_forkserver_preload(["__main__", __name__, fn.__module__, *preload])
        # started before Ctrl-C is held below, so that the server and the processes it forks do not inherit the hold
        multiprocessing.forkserver.ensure_running()
    pool = ProcessPoolExecutor(n_jobs, mp_context=context, max_tasks_per_child=1, initializer=torch.set_num_threads,
                               initargs=(threads,))  # starts no process yet
    # Ctrl-C is held while processes start: one interrupted half-way would be unknown to the pool, the pool would not
    # wait for it, and it would fail on the semaphores this process removes as it exits. The held Ctrl-C arrives
    # once every started process is the pool's.
    hold = hasattr(signal, "pthread_sigmask")
    if hold:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        try:
            futures = [pool.submit(fn, **kwargs) for kwargs in calls]
        finally:
            if hold:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
