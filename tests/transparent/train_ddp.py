"""DDP training on gloo that never mentions pyckpt: DistributedSampler.set_epoch, 2 loader workers,
BatchNorm, dropout, AdamW, per-epoch StepLR. KILL_AT/KILL_MARK: rank 1 SIGKILLs itself once.
TERM_AGENT_AT/KILL_MARK: rank 0 sends SIGTERM to the torchrun agent (its parent) once.
TERM_RANK1_AT/KILL_MARK: rank 1 sends SIGTERM to itself only, once.
TERM_WRAPPER_AT/KILL_MARK: rank 0 sends SIGTERM twice to pyckpt-run (the agent's parent), once.
PERSISTENT=1: the loader's workers persist from epoch to epoch."""
import os, sys, time, torch, torch.nn as nn, torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset, DistributedSampler
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
X = torch.randn(96, 8); Y = torch.randn(96, 1)
ds = TensorDataset(X, Y)
sampler = DistributedSampler(ds, shuffle=True, seed=1)
loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, persistent_workers=bool(os.environ.get("PERSISTENT")))
model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 1))
model = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)
kill_at = int(os.environ.get("KILL_AT", "-1"))
marker = os.environ.get("KILL_MARK", "")
step = 0
for epoch in range(3):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        step += 1
        if step == kill_at and rank == 1 and marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 9)
        if str(step) == os.environ.get("TERM_AGENT_AT") and rank == 0 and marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getppid(), 15)
        if str(step) == os.environ.get("TERM_WRAPPER_AT") and rank == 0 and marker and not os.path.exists(marker):
            open(marker, "w").close()
            with open(f"/proc/{os.getppid()}/stat") as f:
                wrapper = int(f.read().rsplit(")", 1)[1].split()[1])
            os.kill(wrapper, 15)
            time.sleep(0.3)  # the agent is stopping its workers now
            os.kill(wrapper, 15)  # again: an operator's second kill, a supervisor that repeats it
        if str(step) == os.environ.get("TERM_RANK1_AT") and rank == 1 and marker and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 15)
    sched.step()
if rank == 0:
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, sys.argv[1])
dist.destroy_process_group()
