"""Build tiny-lfm2, the embedded model: a 6-layer LFM2 with its own byte-level BPE, briefly pretrained on CPU.

Why it exists: tests and offline runs need a model with LFM2.5's architecture (conv + full_attention layers in its
pattern, its special tokens and ChatML-style template) and a real base distribution, so that KL from the base model
and layer scores mean something, while staying a few MB and trainable on 2 CPU cores.

The corpus exists offline on any machine: docstrings of a fixed list of Python standard-library modules (they vary a
little between Python versions, so BUILD_INFO.json records the version and the corpus sha256), once as plain documents
and once as chats (a question about the documented name, the docstring as the answer), which teach the chat format.
The model never sees a study dataset's row: like a real base model meeting a new SFT dataset, a trial then has
something to learn. The training part of the ten datasets' embedded rows trains the tokenizer only (so their text
tokenizes as compactly as the docstrings); the probe set and the held-out rows are never used.

    python scripts/build_tiny_lfm2.py --out tune_lfm/models/tiny_lfm2 [--steps 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Lfm2Config, Lfm2ForCausalLM, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

# The corpus comes from this checkout's tune_lfm/data, also when another copy of tune_lfm is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# LFM2's special tokens, at LFM2's ids (the list order is the id).
SPECIAL_TOKENS = (
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
)
PAD, BOS, END_OF_TEXT, IM_END = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_end|>"

# LFM2's ChatML-style layout: bos, an optional system turn first, then one <|im_start|>role ... <|im_end|> block per
# message. Every message renders independently of the ones after it, so rendering messages[:k] with a generation prompt
# is a prefix of rendering messages[:k+1]; the trainer masks assistant tokens by that property.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' and not loop.first -%}\n"
    "{{- raise_exception('a system message may only come first') -}}\n"
    "{%- endif -%}\n"
    "{%- set content = message['content'] if message['content'] is string else message['content'] | tojson -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

# Modules present and importable on CPython 3.10+ on Linux, macOS and Windows; sorted, so the walk is deterministic.
STDLIB_MODULES = tuple(sorted("""
abc argparse ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs collections colorsys
concurrent.futures configparser contextlib contextvars copy copyreg csv dataclasses datetime decimal difflib dis doctest
email email.message email.utils enum filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext glob
graphlib gzip hashlib heapq hmac html html.parser http http.client http.cookies http.server imaplib importlib inspect io
ipaddress itertools json json.decoder json.encoder keyword linecache locale logging logging.handlers lzma mailbox
marshal math mimetypes multiprocessing numbers operator optparse os os.path pathlib pdb pickle pickletools pkgutil
platform plistlib poplib pprint profile pstats py_compile queue quopri random re reprlib runpy sched secrets selectors
shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string stringprep struct subprocess
symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize trace traceback
tracemalloc types typing unicodedata unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref
xml.dom.minidom xml.etree.ElementTree xml.sax zipfile zipimport zlib zoneinfo
""".split()))

LAYER_TYPES = ["conv", "conv", "full_attention", "conv", "full_attention", "conv"]  # LFM2.5's pattern, 6 layers
ATTENTION_HEADS, KV_HEADS = 4, 2  # grouped-query attention like LFM2.5 (16 heads, 8 KV heads)
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self==value.") are boilerplate repeated across classes
HELDOUT_EVERY = 20  # every 20th document goes to the held-out split that measures the base distribution
EVAL_BLOCKS = 48  # blocks scored at each evaluation, spread evenly over the split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    parser.add_argument("--steps", type=int, default=500, help="pretraining optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--ff-dim", type=int, default=384, help="block_ff_dim (FFN width, used as is)")
    parser.add_argument("--block-len", type=int, default=256, help="tokens per packed training block")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per optimizer step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is faster than 2 on a busy machine)")
    parser.add_argument(
        "--no-chat-rows",
        action="store_true",
        help="train the tokenizer on docstrings only (for building before tune_lfm.data's embedded rows exist)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "vocab_size", "hidden_size", "ff_dim", "block_len", "batch_size", "eval_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % (2 * ATTENTION_HEADS):
        parser.error(f"--hidden-size must be a multiple of {2 * ATTENTION_HEADS} ({ATTENTION_HEADS} heads, an even "
                     f"head_dim for rotary embeddings), got {args.hidden_size}")
    if args.vocab_size <= len(SPECIAL_TOKENS) + 256:
        parser.error(f"--vocab-size must exceed {len(SPECIAL_TOKENS) + 256} (special tokens + byte alphabet)")
    return args


# ----------------------------------------------------------------------------------------------------------- corpus


def _public_members(module_name: str, module) -> list[tuple[str, object]]:
    """Classes and functions a module defines (not re-exports), with the methods of those classes, in sorted order."""
    members = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in (module_name, "_" + module_name):
            continue
        members.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj):
            for attr, value in sorted(vars(obj).items()):
                if not attr.startswith("_") and (
                    inspect.isroutine(value) or isinstance(value, (property, classmethod, staticmethod))
                ):
                    members.append((f"{module_name}.{name}.{attr}", value))
    return members


def stdlib_docstrings(module_names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """One document per distinct docstring ("qualified.name" line, blank line, docstring); also the modules skipped."""
    documents, seen, skipped = [], set(), []
    for module_name in module_names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            skipped.append(module_name)
            continue
        for qualified_name, obj in [(module_name, module), *_public_members(module_name, module)]:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= MIN_DOC_CHARS and doc not in seen:
                seen.add(doc)
                documents.append(f"{qualified_name}\n\n{doc}")
    return documents, skipped


def render_chat(messages: list[dict]) -> str:
    """The chat template applied exactly as transformers applies it for the saved tokenizer."""
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=CHAT_TEMPLATE, bos_token=BOS)
    return rendered[0]


def embedded_chat_documents() -> tuple[list[str], dict[str, int]]:
    """The training part of every study dataset's embedded rows, rendered; and the row count per dataset."""
    try:
        from tune_lfm.data.loading import embedded_conversations
        from tune_lfm.data.registry import DATASETS
    except ImportError as err:
        raise SystemExit(
            f"the embedded chat rows are not importable from tune_lfm.data ({err}); finish tune_lfm/data first, or "
            "pass --no-chat-rows to build from docstrings only"
        ) from err
    documents, counts = [], {}
    for name in sorted(DATASETS):
        conversations = embedded_conversations(name, part="train")
        counts[name] = len(conversations)
        documents.extend(render_chat(list(messages)) for messages in conversations)
    return documents, counts


DOCSTRING_QUESTIONS = ("What does {name} do?", "Explain {name}.", "How is {name} used?", "Describe {name} briefly.")
SYSTEM_EVERY = 5  # every 5th docstring chat opens with a system turn, so the model knows that role too


def docstring_chats(docstrings: list[str]) -> list[str]:
    """Each docstring document as a rendered chat: a question about its name, the docstring as the answer."""
    chats = []
    for i, document in enumerate(docstrings):
        name, _, text = document.partition("\n\n")
        messages = [{"role": "user", "content": DOCSTRING_QUESTIONS[i % len(DOCSTRING_QUESTIONS)].format(name=name)},
                    {"role": "assistant", "content": text}]
        if i % SYSTEM_EVERY == 0:
            messages.insert(0, {"role": "system", "content": "You explain the Python standard library."})
        chats.append(render_chat(messages))
    return chats


def split_heldout(documents: list[str]) -> tuple[list[str], list[str]]:
    """Every HELDOUT_EVERY-th document is held out; the rest train the tokenizer and the model."""
    train = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def as_pretraining_text(document: str) -> str:
    """Docstrings are framed like any pretraining document; rendered chats already start with bos."""
    return document if document.startswith(BOS) else f"{BOS}{document}{END_OF_TEXT}"


# -------------------------------------------------------------------------------------------------------- tokenizer

_SPECIAL_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose first ids are LFM2's special tokens; merges are learned from the text between them."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    pieces = (piece for text in texts for piece in _SPECIAL_PATTERN.split(text) if piece)
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens landed at ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """The transformers tokenizer: LFM2's bos/eos/pad, bos prepended to plain text, and the chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------------ pretraining


def pack_blocks(tokenizer: Tokenizer, texts: list[str], block_len: int) -> torch.Tensor:
    """Concatenate the documents' tokens and cut them into full blocks (the tail shorter than a block is dropped)."""
    ids = [i for encoding in tokenizer.encode_batch(texts, add_special_tokens=False) for i in encoding.ids]
    n_blocks = len(ids) // block_len
    if n_blocks == 0:
        raise RuntimeError(f"corpus has {len(ids)} tokens, fewer than one block of {block_len}")
    return torch.tensor(ids[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """At most n blocks taken evenly across the tensor, so an evaluation sees every source of the corpus."""
    return blocks[:: max(1, len(blocks) // n)][:n]


def build_model(args: argparse.Namespace, max_length: int) -> Lfm2ForCausalLM:
    config = Lfm2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ff_dim,
        block_auto_adjust_ff_dim=False,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=ATTENTION_HEADS,
        num_key_value_heads=KV_HEADS,
        conv_L_cache=3,
        conv_bias=False,
        max_position_embeddings=max_length,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(IM_END),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        architectures=["Lfm2ForCausalLM"],
    )
    torch.manual_seed(args.seed)
    model = Lfm2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


@torch.no_grad()
def mean_loss(model: Lfm2ForCausalLM, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss in nats over all predicted positions of the blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        n = batch.numel() - len(batch)  # positions with a next token
        total += model(input_ids=batch, labels=batch).loss.item() * n
        count += n
    model.train()
    return total / count


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Lfm2ForCausalLM, train: torch.Tensor, heldout: torch.Tensor, args) -> dict:
    """Plain causal-LM pretraining on random packed blocks; returns the loss curve (nats)."""
    generator = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    heldout = spread(heldout, EVAL_BLOCKS)
    curve = {"step": [], "train_loss": [], "heldout_loss": []}
    order, cursor, window, started = torch.randperm(len(train), generator=generator), 0, [], time.time()
    model.train()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            heldout_loss = mean_loss(model, heldout, args.batch_size)
            train_loss = (
                sum(window) / len(window) if window else mean_loss(model, spread(train, EVAL_BLOCKS), args.batch_size)
            )
            curve["step"].append(step)
            curve["train_loss"].append(round(train_loss, 4))
            curve["heldout_loss"].append(round(heldout_loss, 4))
            print(f"step {step:4d}  train {train_loss:.3f}  heldout {heldout_loss:.3f}  "
                  f"({time.time() - started:.0f}s)", flush=True)
            window = []
        if step == args.steps:
            break
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        batch = train[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"pretraining loss became {loss.item()} at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
    model.eval()
    return curve


# ------------------------------------------------------------------------------------------------------------ main


def sha256_text(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_info(args, corpus: dict, model, curve: dict, heldout_by_source: dict, timings: dict) -> dict:
    """Everything needed to rebuild the model and to judge its base distribution."""
    files = sorted(p for p in args.out.iterdir() if p.is_file() and p.name != "BUILD_INFO.json")
    return {
        "script": "scripts/build_tiny_lfm2.py",
        "parameters": {k: v for k, v in sorted(vars(args).items()) if k != "out"},
        "seed": args.seed,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "architecture": {"layer_types": LAYER_TYPES, "parameters": sum(p.numel() for p in model.parameters())},
        "corpus": corpus,
        "pretraining": {
            "uniform_loss": round(math.log(model.config.vocab_size), 4),
            "initial_loss": curve["train_loss"][0],
            "final_loss": curve["train_loss"][-1],
            "initial_heldout_loss": curve["heldout_loss"][0],
            "final_heldout_loss": curve["heldout_loss"][-1],
            "final_heldout_loss_by_source": {
                name: round(mean_loss(model, blocks, args.batch_size), 4) for name, blocks in heldout_by_source.items()
            },
            "loss_definition": "mean next-token loss in nats; train_loss at step 0 is measured on training blocks, "
            "later it is the mean over the steps since the previous evaluation; heldout_loss is measured on up to "
            f"{EVAL_BLOCKS} held-out blocks (by_source: all held-out blocks of that source)",
            "tokens_seen": args.steps * args.batch_size * args.block_len,
            "curve": curve,
        },
        "seconds": timings,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    max_length = 2048

    docstrings, skipped_modules = stdlib_docstrings(STDLIB_MODULES)
    print(f"docstrings: {len(docstrings)} documents from {len(STDLIB_MODULES) - len(skipped_modules)} modules "
          f"(skipped: {skipped_modules or 'none'})", flush=True)
    chats, chat_rows = ([], {}) if args.no_chat_rows else embedded_chat_documents()
    print(f"chat rows: {sum(chat_rows.values())} ({chat_rows or 'not used'})", flush=True)

    tokenizer_sources = {"docstrings": docstrings, "chats": chats}
    tokenizer_docs = [doc for docs in tokenizer_sources.values() for doc in split_heldout(
        [as_pretraining_text(d) for d in docs])[0]]
    bpe = train_tokenizer(tokenizer_docs, args.vocab_size)

    sources = {"docstrings": docstrings, "docstring_chats": docstring_chats(docstrings)}
    splits = {name: split_heldout([as_pretraining_text(doc) for doc in docs]) for name, docs in sources.items()}
    train_docs = [doc for train, _ in splits.values() for doc in train]
    train_blocks = pack_blocks(bpe, train_docs, args.block_len)
    heldout_by_source = {name: pack_blocks(bpe, held, args.block_len) for name, (_, held) in splits.items() if held}
    heldout_blocks = torch.cat(list(heldout_by_source.values()))
    if chats:  # never trained on: how well the base model predicts the study datasets' rows
        heldout_by_source["study_chats_unseen"] = spread(pack_blocks(bpe, chats, args.block_len), EVAL_BLOCKS)
    tokenizer = wrap_tokenizer(bpe, max_length)
    print(f"tokenizer: vocab {len(tokenizer)}; train {train_blocks.numel()} tokens in {len(train_blocks)} blocks, "
          f"held out {heldout_blocks.numel()} tokens in {len(heldout_blocks)} blocks", flush=True)
    all_docs = [doc for train, held in splits.values() for doc in train + held]
    corpus = {
        "sha256": sha256_text(all_docs),
        "documents": len(all_docs),
        "characters": sum(map(len, all_docs)),
        "docstring_documents": len(docstrings),
        "stdlib_modules": list(STDLIB_MODULES),
        "stdlib_modules_skipped": skipped_modules,
        "chat_rows_per_dataset": chat_rows,
        "chat_part": None if args.no_chat_rows else "train",
        "chat_rows_use": "tokenizer only; the model is pretrained on docstrings and docstring chats",
        "docstring_chats": len(sources["docstring_chats"]),
        "heldout_rule": f"every {HELDOUT_EVERY}th document of each source",
        "train_tokens": train_blocks.numel(),
        "heldout_tokens": heldout_blocks.numel(),
    }
    corpus_s = time.time() - started

    model = build_model(args, max_length)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, layers {LAYER_TYPES}", flush=True)
    pretrain_started = time.time()
    curve = pretrain(model, train_blocks, heldout_blocks, args)
    pretrain_s = time.time() - pretrain_started

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    timings = {"corpus_and_tokenizer": round(corpus_s, 1), "pretraining": round(pretrain_s, 1)}
    info = build_info(args, corpus, model, curve, heldout_by_source, timings)
    info["seconds"]["total"] = round(time.time() - started, 1)
    (args.out / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n")
    size_mb = sum(f["bytes"] for f in info["files"].values()) / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB) in {info['seconds']['total']:.0f}s; loss {curve['train_loss'][0]:.3f} "
          f"-> train {curve['train_loss'][-1]:.3f}, held out {curve['heldout_loss'][-1]:.3f} "
          f"{info['pretraining']['final_heldout_loss_by_source']}", flush=True)


if __name__ == "__main__":
    main()
