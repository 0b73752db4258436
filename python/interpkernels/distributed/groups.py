"""The process group's lifetime: made, timed out, destroyed so that ranks exit cleanly.

Kept apart from the launcher (launch.py imports interpkernels.train, which
imports the checkpoint code of this package), so that importing
interpkernels.distributed never imports the training loop.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

# gloo's own default is 30 minutes: a stopped rank would hang the run that long.
DEFAULT_TIMEOUT_SECONDS = 600.0


@contextlib.contextmanager
def process_group(backend: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS, **init_options) -> Iterator[None]:
    """The default process group, destroyed on exit, so that the process exits cleanly.

    timeout: seconds a collective waits for the other ranks. On gloo, a
    collective that waits longer (a rank hung, stopped, or far slower than
    the others) raises TimeoutError naming this rank and the timeout; on
    NCCL, its watchdog ends the rank with its own message after as long.

    torch.distributed.fsdp, once imported with a group alive (torch._dynamo
    imports it, lazily: on the first meta-device decomposition, say), holds
    the group in default arguments, so destroy_process_group cannot free it
    and gloo's worker threads outlive the interpreter. A worker still
    releasing the last collective's tensors then waits for the GIL while the
    main thread finalises, and the rank dies with SIGABRT ("terminate called
    without an active exception"; 1 exit in 3 of the 3-rank test on 2
    cores). So torch._dynamo is imported before the group exists (it then
    holds nothing, and destroying the group joins its threads), and a clean
    exit first waits at a barrier, which releases the GIL until every earlier
    collective is done. No barrier on an exception: other ranks may never
    reach it.
    """
    import torch._dynamo  # noqa: F401  (see above: before init_process_group)

    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **init_options)
    try:
        yield
        dist.barrier()
    except RuntimeError as error:
        # gloo says "Timed out waiting <ms> for recv operation to complete", in a plain RuntimeError.
        if "timed out" not in str(error).lower():
            raise
        raise TimeoutError(f"rank {dist.get_rank()}: a collective waited longer than the process group's timeout "
                           f"({timeout:g} s) for the other ranks: one has stopped answering (hung, stopped, or far "
                           f"slower than the others). {error}") from error
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def torchrun_process_group(program: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Iterator[torch.device]:
    """The default process group of a torchrun launch, destroyed on exit, and
    this rank's device: NCCL and cuda:LOCAL_RANK with GPUs, else gloo on the
    CPU. SystemExit naming `program` outside torchrun."""
    if "RANK" not in os.environ:
        raise SystemExit(f"{program}: run it under torchrun (e.g. torchrun --nproc-per-node 2 -m {program} ...)")
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    with process_group("nccl" if use_cuda else "gloo", timeout=timeout):
        yield device
