"""Fine-tune a tiny causal language model with the Hugging Face Trainer.

A plain Trainer script: a small randomly initialised Llama model, a word-level
tokenizer built here from the text below (no downloads), bf16 autocast, gradient accumulation
over two micro-batches, a linear learning-rate schedule stepped every optimizer
step, two DataLoader worker processes, a loss line per optimizer step (a
callback) and the Trainer's own checkpoints every few steps. Runs in seconds.

    python examples/train_trainer.py --out final.pt
    python examples/train_trainer.py --out final.pt --resume   # the Trainer's own resume as well
    torchrun --standalone --nproc-per-node 2 examples/train_trainer.py --out final.pt
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import Dataset
from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Trainer, TrainerCallback, TrainingArguments)
from transformers.trainer_utils import get_last_checkpoint

TEXT = """the quick brown fox jumps over the lazy dog and the cat sat on the mat while a bird
sang in the old tree near the river bank every morning before the sun rose high above the hills
and the farmer walked his cows down the long road to the market where people sold bread and milk"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune a tiny causal LM with the Trainer.")
    p.add_argument("--out", required=True, help="where to write the final state (torch.save)")
    p.add_argument("--output-dir", default=None, help="the Trainer's output_dir (default: next to --out)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=44, help="training sequences (11 micro-batches of 4)")
    p.add_argument("--save-steps", type=int, default=4, help="the Trainer's own checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: load in the main process)")
    p.add_argument("--word-dropout", type=float, default=0.0,
                   help="replace each input token by [UNK] with this probability when a batch is collated "
                        "(random draws in the process that collates: the main one with --workers 0)")
    p.add_argument("--mask-seed", type=int, default=None,
                   help="collate with transformers' DataCollatorForLanguageModeling(seed=N): it masks 30%% of the "
                        "tokens from a generator of its own, made in the process that collates")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint-N in the output dir, if any (the Trainer's own resume)")
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each optimizer step (stand-in for a bigger model)")
    p.add_argument("--eval-steps", type=int, default=0,
                   help="evaluate on 12 other windows every N optimizer steps, printing 'eval N loss X' (0: never)")
    p.add_argument("--persistent-workers", action="store_true",
                   help="keep the DataLoader worker processes between epochs and evaluations")
    p.add_argument("--dropout", type=float, default=0.0, help="the model's attention dropout while training")
    return p.parse_args()


def make_tokenizer(mask: bool = False) -> PreTrainedTokenizerFast:
    words = sorted(set(TEXT.split()))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *(["[MASK]"] if mask else []), *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   **({"mask_token": "[MASK]"} if mask else {}))


class Windows(Dataset):
    """Fixed-length windows of the text at seeded random offsets."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, n: int, length: int = 12, seed: int = 1) -> None:
        ids = tokenizer(TEXT)["input_ids"]
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - length, (n,), generator=g).tolist()
        self.items = [torch.tensor(ids[s:s + length]) for s in starts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i], "labels": self.items[i]}


class WordDropout:
    """A data collator that draws random numbers (as masking collators do): each input token becomes
    [UNK] with probability ``p``."""

    def __init__(self, p: float, unk: int) -> None:
        self.p, self.unk = p, unk

    def __call__(self, items: list) -> dict:
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids.masked_fill(torch.rand(ids.shape) < self.p, self.unk),
                "labels": torch.stack([it["labels"] for it in items])}


class PrintLoss(TrainerCallback):
    """One line per optimizer step: ``step N epoch E loss X``."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            epoch = max(math.ceil(state.epoch) - 1, 0)
            print(f"step {state.global_step} epoch {epoch} loss {logs['loss']!r}", flush=True)
            time.sleep(self.sleep)
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            print(f"eval {state.global_step} loss {logs['eval_loss']!r}", flush=True)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokenizer = make_tokenizer(mask=args.mask_seed is not None)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         attention_dropout=args.dropout)
    model = LlamaForCausalLM(config)
    output_dir = args.output_dir or str(Path(args.out).with_suffix(".trainer"))
    training_args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=args.epochs, learning_rate=1e-3, lr_scheduler_type="linear", weight_decay=0.01,
        logging_steps=1, save_steps=args.save_steps, report_to=[], dataloader_num_workers=args.workers,
        use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True, bf16=True,
        dataloader_persistent_workers=args.persistent_workers and args.workers > 0,
        **({"eval_strategy": "steps", "eval_steps": args.eval_steps, "per_device_eval_batch_size": 4}
           if args.eval_steps else {}))
    collator = {"data_collator": WordDropout(args.word_dropout, tokenizer.unk_token_id)} if args.word_dropout else {}
    if args.mask_seed is not None:
        collator = {"data_collator": DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3,
                                                                     seed=args.mask_seed)}
    evaluation = {"eval_dataset": Windows(tokenizer, 12, seed=2)} if args.eval_steps else {}
    trainer = Trainer(model=model, args=training_args, train_dataset=Windows(tokenizer, args.samples),
                      callbacks=[PrintLoss(args.step_sleep)], **collator, **evaluation)
    # As the Hugging Face example scripts do: resume from the last checkpoint-N when there is one.
    last = get_last_checkpoint(output_dir) if args.resume and os.path.isdir(output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    if trainer.is_world_process_zero():
        torch.save({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(),
                    "sched": trainer.lr_scheduler.state_dict(), "global_step": trainer.state.global_step},
                   args.out)
    # Under torchrun: every rank is past its last collective, then the process group goes down before
    # exit. Left to interpreter exit, gloo can abort the process ("terminate called without an active
    # exception"); destroyed right after a collective, it can deadlock: gloo's worker thread may still
    # be releasing that collective's tensors, which needs the GIL the destroying thread holds. The
    # barrier waits with the GIL released, so those threads are idle before the group is destroyed.
    # The barrier's own work object is freed by a gloo thread just after the barrier returns, which
    # can also need the GIL: the short sleep (GIL released) lets it finish before teardown (a CI run
    # hung there, in the destruction of this function's locals, once in about ten).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        time.sleep(0.5)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
