"""Training script of test_trainer_objects.py: a Hugging Face Trainer whose state partly lives in objects of
the script's classes that only the Trainer holds. ``python trainer_objects_train.py OUT``.

* ``Anneal``, a callback counting its calls (``self.calls``) and drawing from its own generator, anneals
  the masking collator's ``mlm_probability`` after each step (the collator of a library's class);
* ``NoisyTrainer``, a Trainer subclass scaling the loss by a draw from its own generator in
  ``compute_loss``, made and trained in one expression (``NoisyTrainer(...).train()``: no variable holds it).

Loads in the main process (accelerate's look-ahead fetches each batch one step ahead, so a batch is
collated before the callback of the step before it has run). KILL_AT: SIGKILL after that optimizer step
(once: KILL_MARK).
"""
import os
import signal
import sys
import tempfile

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import Dataset
from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast,
                          Trainer, TrainerCallback, TrainingArguments)

TEXT = "the quick brown fox jumps over the lazy dog and the cat sat on the mat while a bird sang in the old tree"


class Windows(Dataset):
    def __init__(self, tok, n=32, length=8):
        ids = tok(TEXT)["input_ids"]
        starts = torch.randint(0, len(ids) - length, (n,), generator=torch.Generator().manual_seed(1)).tolist()
        self.items = [ids[s:s + length] for s in starts]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


class Anneal(TrainerCallback):
    def __init__(self, collator):
        self.collator, self.calls, self.rng = collator, 0, np.random.default_rng(2)

    def on_step_end(self, args, state, control, **kwargs):
        self.calls += 1
        self.collator.mlm_probability = 0.15 + 0.02 * (self.calls % 7) + 0.05 * float(self.rng.random())


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if str(state.global_step) == os.environ.get("KILL_AT") and not os.path.exists(os.environ["KILL_MARK"]):
            open(os.environ["KILL_MARK"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


class NoisyTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = torch.Generator().manual_seed(3)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = model(**inputs)
        loss = out.loss * (1 + 0.1 * torch.rand((), generator=self.noise))
        return (loss, out) if return_outputs else loss


words = sorted(set(TEXT.split()))
vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[MASK]", *words])}
backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
torch.manual_seed(0)
model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16))
args = TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=3, per_device_train_batch_size=4,
                         learning_rate=1e-3, save_strategy="no", report_to=[], logging_strategy="no",
                         dataloader_num_workers=0, seed=0, use_cpu=True, disable_tqdm=True)
collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.3, seed=5)
NoisyTrainer(model=model, args=args, train_dataset=Windows(tok), data_collator=collator,
             callbacks=[Anneal(collator), KillAt()]).train()
torch.save(model.state_dict(), sys.argv[1])
