#!/usr/bin/env python3
"""Train a small SentencePiece tokenizer for tests and demos: OUT_PREFIX.model.

The model is trained by `spm_train` (Debian package `sentencepiece`) on a built-in corpus
of English sentences and some accented Latin, Greek, Cyrillic, CJK and emoji text. It is
configured like Grok-1's tokenizer, so code that works with one works with the other:

  BPE, byte fallback, identity normalization, a dummy prefix space, no whitespace
  squeezing, digits split, whitespace-only pieces allowed;
  id 0 [PAD], id 1 [BOS], id 2 [EOS], id 3 [UNK] (the unknown surface is "[UNK]").

--character-coverage < 1 leaves the rarest characters of the corpus out of the vocabulary,
so they are encoded as byte pieces (<0xE2><0x82><0xAC>). Characters that are not in the
corpus at all always are: the corpus deliberately contains no euro sign (U+20AC) and no
character outside the Basic Multilingual Plane other than its few emoji, so tests can rely
on "€" and "𝄞" (U+1D11E) falling back to bytes.

The output depends only on the flags: training runs single-threaded in a scratch
directory with relative file names (spm_train records the input and prefix names in the
model), so two runs write identical files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CORPUS_EN = """\
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
The answer to life the universe and everything is of course forty-two.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom.
All happy families are alike; each unhappy family is unhappy in its own way.
In the beginning the Universe was created. This has made a lot of people very angry.
Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.
The sky above the port was the color of television, tuned to a dead channel.
Tokenizers split text into pieces; a model reads the pieces as numbers.
Large language models predict the next token from the tokens that came before it.
The weights of the model are stored in shards, and each shard has a checksum.
We measured the throughput at 1234 tokens per second on 8 GPUs with 80 GB each.
Version 2.0 was released on 2024-03-17 with 314 billion parameters in total.
Please read the manual before you run the program for the first time.
He said: "I will be there at 7:30, unless the train is late again."
What time is it? It is half past nine, and the meeting starts at ten.
The river flowed quietly under the old stone bridge near the village.
Mathematics is the language in which the universe is written.
To be, or not to be, that is the question.
Errors should never pass silently, unless explicitly silenced.
Simple is better than complex, and complex is better than complicated.
The cat sat on the mat, and the dog slept by the warm fire.
Numbers like 3.14159, 2.71828 and 1.41421 appear everywhere in science.
An expert is a person who has made all the mistakes that can be made in a narrow field.
The children played in the garden until the sun went down behind the hills.
Good morning! How are you today? I am fine, thank you very much.
The library opens at nine in the morning and closes at six in the evening.
Every line of code is a liability; every test is an asset.
The mixture of experts routes each token to two of the eight experts.
Attention is computed between every pair of positions in the sequence.
Rotary embeddings rotate the queries and keys by an angle that depends on the position.
When in doubt, use brute force.
Premature optimization is the root of all evil.
The memory of the machine holds the activations, the weights and the cache.
Streaming output shows the text as soon as each word is complete.
She opened the window and let the cold winter air fill the room.
They walked along the beach, collecting shells and smooth grey stones.
My favourite colours are blue, green and a very deep shade of red.
The committee will meet again next Tuesday to discuss the budget.
If you can read this sentence, the decoder is working correctly.
Water boils at one hundred degrees at sea level.
Light travels about three hundred thousand kilometres every second.
The program printed the result and exited with status zero.
Keep calm and carry on.
"""

CORPUS_INTL = """\
Le café est très bon, mais le thé est délicieux aussi.
Où est la bibliothèque ? Elle est à côté de l'école.
Les élèves étudient la géographie et l'histoire de la région.
El niño comió una manzana y bebió un vaso de leche.
¿Dónde está la estación? Está a la izquierda, señor.
Mañana vamos a la playa con nuestros amigos.
Die Straße ist nass, weil es gestern geregnet hat.
Grüße aus München! Wir hören Musik und trinken Kaffee.
Über den Wolken muss die Freiheit wohl grenzenlos sein.
São Paulo é uma cidade enorme, com muitos prédios.
Ελληνικά: Η γλώσσα είναι όμορφη και πολύ παλιά.
Καλημέρα, τι κάνεις; Είμαι καλά, ευχαριστώ.
Το φως ταξιδεύει πολύ γρήγορα.
Привет, как дела? Всё хорошо, спасибо.
Москва большой город.
日本語のテキストも少し含まれています。
今日は天気がいいですね。
我们正在学习中文和数学。
你好，世界！
한국어도 조금 있습니다.
Emoji: 😀 🎉 🚀 👍 ❤️ 🌍
The party was great 🎉 and everyone was happy 😀.
"""

DEFAULTS = {
    "vocab_size": 512,
    "model_type": "bpe",
    "character_coverage": 0.995,
}


def corpus_text() -> str:
    return CORPUS_EN + CORPUS_INTL


def spm_train_args(vocab_size: int, model_type: str, character_coverage: float,
                   input_name: str, prefix: str) -> list[str]:
    return [
        f"--input={input_name}",
        f"--model_prefix={prefix}",
        f"--model_type={model_type}",
        f"--vocab_size={vocab_size}",
        f"--character_coverage={character_coverage!r}",
        "--byte_fallback=true",
        "--normalization_rule_name=identity",
        "--add_dummy_prefix=true",
        "--remove_extra_whitespaces=false",
        "--split_digits=true",
        "--allow_whitespace_only_pieces=true",
        "--pad_id=0", "--bos_id=1", "--eos_id=2", "--unk_id=3",
        "--pad_piece=[PAD]", "--bos_piece=[BOS]", "--eos_piece=[EOS]", "--unk_piece=[UNK]",
        "--unk_surface=[UNK]",
        "--num_threads=1",
        "--input_sentence_size=0",
        "--shuffle_input_sentence=false",
        "--hard_vocab_limit=true",
    ]


def train(out_prefix: str, vocab_size: int = DEFAULTS["vocab_size"],
          model_type: str = DEFAULTS["model_type"],
          character_coverage: float = DEFAULTS["character_coverage"],
          spm_train: str = "spm_train", force: bool = False, verbose: bool = False,
          dry_run: bool = False) -> str:
    """Trains the model and writes OUT_PREFIX.model; returns its path. Raises ValueError,
    FileExistsError or RuntimeError (spm_train missing or failing) with a message."""
    if vocab_size < 1:
        raise ValueError(f"--vocab-size must be positive, got {vocab_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    out_path = out_prefix + ".model"
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: the output directory does not exist")
    if os.path.exists(out_path) and not force:
        raise FileExistsError(f"{out_path} exists (pass --force to overwrite it)")
    exe = shutil.which(spm_train)
    if exe is None:
        raise RuntimeError(f"{spm_train} not found: install the Debian package 'sentencepiece' "
                           "(scripts/install-deps.sh does)")
    args = spm_train_args(vocab_size, model_type, character_coverage, "corpus.txt", "t")
    if dry_run:
        print(" ".join([exe] + args))
        return out_path
    with tempfile.TemporaryDirectory(prefix="make_tokenizer.") as tmp:
        with open(os.path.join(tmp, "corpus.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write(corpus_text())
        proc = subprocess.run([exe] + args, cwd=tmp, stdin=subprocess.DEVNULL,
                              stdout=None if verbose else subprocess.PIPE,
                              stderr=None if verbose else subprocess.STDOUT)
        if proc.returncode != 0:
            log = "" if verbose else proc.stdout.decode("utf-8", "replace")
            tail = "\n".join(log.strip().splitlines()[-10:])
            raise RuntimeError(f"spm_train failed (exit status {proc.returncode})"
                               + (f":\n{tail}" if tail else ""))
        model = os.path.join(tmp, "t.model")
        if not os.path.isfile(model):
            raise RuntimeError("spm_train succeeded but wrote no t.model")
        tmp_out = out_path + ".tmp"
        shutil.copyfile(model, tmp_out)
        os.replace(tmp_out, out_path)
    return out_path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Train a small Grok-1-like SentencePiece tokenizer (BPE, byte fallback, "
                    "[PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3) on a built-in corpus and write "
                    "OUT_PREFIX.model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out_prefix", metavar="OUT_PREFIX", help="writes OUT_PREFIX.model")
    ap.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"],
                    help="number of pieces, including the 4 special and 256 byte pieces")
    ap.add_argument("--model-type", choices=["bpe", "unigram"], default=DEFAULTS["model_type"],
                    help="SentencePiece model type")
    ap.add_argument("--character-coverage", type=float, default=DEFAULTS["character_coverage"],
                    help="fraction of the corpus' characters covered by the vocabulary; "
                         "the rest fall back to byte pieces")
    ap.add_argument("--spm-train", default="spm_train", help="the spm_train executable")
    ap.add_argument("--force", action="store_true", help="overwrite OUT_PREFIX.model")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the spm_train command and write nothing")
    ap.add_argument("--verbose", action="store_true", help="show spm_train's log")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = train(args.out_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
                     character_coverage=args.character_coverage, spm_train=args.spm_train,
                     force=args.force, verbose=args.verbose, dry_run=args.dry_run)
    except (ValueError, FileExistsError, RuntimeError, OSError) as e:
        print(f"make_tokenizer: error: {e}", file=sys.stderr)
        return 2
    if args.verbose and not args.dry_run:
        print(f"make_tokenizer: wrote {path} ({os.path.getsize(path):,} bytes, "
              f"{args.vocab_size} pieces)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
