"""An IterableDataset loaded in the main process; DS=draws: it adds noise from the global torch generator
while it yields (DS=plain: only its own generator); DROP=1: the model has dropout (the step draws too)."""
import os, sys, torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
MODE = os.environ.get("DS", "draws")
class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for i in range(40):
            x = torch.randn(6, generator=g)
            if MODE == "draws":
                x = x + torch.rand(6)  # noise from the global generator while it yields
            yield x, x.sum(0, keepdim=True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2 if os.environ.get("DROP", "1") == "1" else 0.0), nn.Linear(8, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for epoch in range(2):
    for x, y in DataLoader(Stream(), batch_size=4):
        opt.zero_grad(); ((model(x) - y) ** 2).mean().backward(); opt.step()
print("DONE", flush=True)
