"""DDP training on gloo that records every sample it trains and never mentions pyckpt.

Run it under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) with
PYCKPT_DIR set; kill it; relaunch it with another number of ranks: the rest of the interrupted
epoch is split across the new ranks, and the logs show every sample of that epoch trained once.

Environment (all optional):
  SAMPLES_LOG   directory; each rank writes <RUN>-<rank>.txt, one line "epoch step idx idx ..." per step,
                and <RUN>-first-<rank>.pt: the model and optimizer state at its first batch (after a resume:
                the restored state)
  RUN           name of this launch in the log file names (default "run")
  DROP_LAST     1: DistributedSampler(drop_last=True)
  EPOCHS        number of epochs (default 3)
  STOP_AT, STOP_AFTER   after optimizer step STOP_AT, once the file STOP_AFTER exists (a committed
                checkpoint), write <RUN>-<rank>.stopped (holding the pid) and wait to be killed (tests
                SIGKILL the job); once per log directory. STOP_RANK: only that rank stops
"""
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
n = 27
ds = TensorDataset(torch.arange(n), torch.randn(n, 4), torch.randn(n, 1))
sampler = DistributedSampler(ds, shuffle=True, seed=3, drop_last=os.environ.get("DROP_LAST") == "1")
loader = DataLoader(ds, batch_size=3, sampler=sampler)
model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
logdir, run = os.environ.get("SAMPLES_LOG"), os.environ.get("RUN", "run")
log = open(os.path.join(logdir, f"{run}-{rank}.txt"), "w") if logdir else None
for epoch in range(int(os.environ.get("EPOCHS", "3"))):
    sampler.set_epoch(epoch)
    for idx, x, y in loader:
        first = os.path.join(logdir, f"{run}-first-{rank}.pt") if logdir else ""
        if first and not os.path.exists(first):  # a file, not a variable: pyckpt may restore variables
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, first)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        step = int(opt.state[model.module.weight]["step"])  # survives a resume, unlike a local counter
        if log:
            log.write(f"{epoch} {step} {' '.join(map(str, idx.tolist()))}\n")
            log.flush()
        stopped = os.path.join(logdir, f"{run}-{rank}.stopped") if logdir else ""
        if step == int(os.environ.get("STOP_AT", "-1")) and os.environ.get("STOP_RANK", str(rank)) == str(rank) \
                and not os.path.exists(stopped):  # once: a restarted attempt passes this step again
            deadline = time.monotonic() + 120
            while not os.path.exists(os.environ["STOP_AFTER"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            with open(stopped + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(stopped + ".tmp", stopped)
            time.sleep(600)
if rank == 0 and log:
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(logdir, f"{run}-final.pt"))
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
