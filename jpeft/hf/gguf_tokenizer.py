"""The tokenizer a GGUF file describes, built from its metadata with ``tokenizers`` alone.

A GGUF file carries no ``tokenizer.json``: llama.cpp stores the vocabulary, the merges, the
token types and the special token ids as ``tokenizer.ggml.*`` metadata, and the chat template
as ``tokenizer.chat_template``. transformers can rebuild a tokenizer from them, but its GGUF
reader imports torch (transformers 5.24), and torch is not a dependency of jpeft. So jpeft
reads the metadata with the ``gguf`` package and builds the same tokenizer itself; the test
suite checks it against transformers' GGUF tokenizer token for token.

Two vocabulary kinds, by ``tokenizer.ggml.model``:

* ``"gpt2"``: byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2/3). Tokens are spelled in GPT-2's
  byte alphabet; a token spelled in plain text is re-spelled byte by byte. Text is split by the
  regex of ``tokenizer.ggml.pre`` where one is known, else by GPT-2's.
* ``"llama"``: SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral). ``"▁"``
  marks a space and is prepended to the first word; files without merges get them from the
  token scores, best score first. A BOS token is added unless the file says otherwise.

Control tokens (type 3) become special added tokens, user-defined tokens (type 4) plain added
tokens, so that neither is cut into pieces.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from jpeft.hf import gguf

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

# The splits of byte-level vocabularies whose merges were not learned on GPT-2's split, by
# `tokenizer.ggml.pre` (the regexes of the models' own tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], _LLAMA3_SPLIT
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
}
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def read_tokenizer(path: str | os.PathLike):
    """The tokenizer of a GGUF file, as a transformers ``PreTrainedTokenizerFast``.

    Args:
      path: a ``.gguf`` file with ``tokenizer.ggml.*`` metadata.

    Returns:
      A tokenizer with the file's special tokens, BOS/EOS flags and chat template, equal to
      ``AutoTokenizer.from_pretrained(folder, gguf_file=name)`` without needing torch.

    Raises:
      ValueError: the file is missing, not GGUF, corrupt, has no tokenizer metadata, or a
        vocabulary kind jpeft cannot build (named in the message).

    Example::

        tokenizer = read_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    """
    from transformers import PreTrainedTokenizerFast

    reader = gguf.open_reader(path)
    try:
        meta = _tokenizer_metadata(reader)
        backend = _build(meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    tokens = meta["tokens"]
    special = {
        name: tokens[meta[key]] if meta.get(key) is not None else None
        for name, key in _SPECIAL_TOKEN_IDS.items()
    }
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    add_bos = meta.get("add_bos_token", meta["model"] == "llama")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("chat_template"),
        add_bos_token=add_bos,
        add_eos_token=meta.get("add_eos_token", False),
        **special,
    )


def _tokenizer_metadata(reader) -> dict:
    """The ``tokenizer.*`` metadata, keyed without the ``tokenizer.ggml.`` prefix."""
    prefix = "tokenizer.ggml."
    meta = {
        key[len(prefix) :]: gguf.metadata_value(reader, key)
        for key in reader.fields
        if key.startswith(prefix)
    }
    template = gguf.metadata_value(reader, "tokenizer.chat_template", None)
    if template is not None:
        meta["chat_template"] = template
    if "model" not in meta or "tokens" not in meta:
        raise ValueError(
            "no tokenizer in the GGUF metadata (tokenizer.ggml.model and tokenizer.ggml.tokens "
            "are missing)"
        )
    for key in ("scores", "token_type"):
        if key in meta and len(meta[key]) != len(meta["tokens"]):
            raise ValueError(
                f"tokenizer.ggml.{key} has {len(meta[key])} entries for "
                f"{len(meta['tokens'])} tokens"
            )
    for key in _SPECIAL_TOKEN_IDS.values():
        token_id = meta.get(key)
        if token_id is not None and not 0 <= token_id < len(meta["tokens"]):
            raise ValueError(
                f"tokenizer.ggml.{key} = {token_id} is outside the vocabulary of "
                f"{len(meta['tokens'])} tokens"
            )
    return meta


def _build(meta: dict) -> Tokenizer:
    builders = {"gpt2": _byte_level, "llama": _sentencepiece}
    if meta["model"] not in builders:
        raise ValueError(
            f"tokenizer.ggml.model {meta['model']!r} is not supported; jpeft builds 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies"
        )
    try:
        tokenizer = builders[meta["model"]](meta)
    except Exception as err:  # tokenizers raises a bare Exception for a merge it cannot resolve
        raise ValueError(f"the vocabulary and merges do not fit together: {err}") from err
    _add_marked_tokens(tokenizer, meta)
    return tokenizer


def _byte_level(meta: dict) -> Tokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): index
        for index, token in enumerate(meta["tokens"])
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=_merges(meta, vocab),
        fuse_unk=False,
        continuing_subword_prefix="",
        end_of_word_suffix="",
    )
    tokenizer = Tokenizer(bpe)
    split = _SPLITS.get(meta.get("pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: dict) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(meta["tokens"])}
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=_merges(meta, vocab), fuse_unk=True, byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer


def _merges(meta: dict, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges; else every split of a token into two tokens, ranked by the score of
    the token they make (best first), ties broken by the shorter left piece, then by id."""
    if "merges" in meta:
        return [tuple(merge.split(" ", 1)) for merge in meta["merges"]]
    if "scores" not in meta:
        raise ValueError("the vocabulary has neither merges nor scores to rank merges by")
    ranked = []
    for token, score in zip(meta["tokens"], meta["scores"], strict=True):
        pairs = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked += [(score, pair) for pair in pairs]
    ranked.sort(key=lambda item: (item[0], len(item[1][0]), len(item[1][1])), reverse=True)
    return [pair for _, pair in ranked]


def _add_marked_tokens(tokenizer: Tokenizer, meta: dict) -> None:
    """Control tokens as special tokens, user-defined ones as plain added tokens.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a mislabel
    of llama.cpp's; adding it would grow the vocabulary past the model's, so it is skipped.
    """
    types = meta.get("token_type") or [0] * len(meta["tokens"])
    alphabet = set(_byte_alphabet().values()) if meta["model"] == "gpt2" else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(meta["tokens"], types, strict=True)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    tokenizer.add_special_tokens(control)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(meta["tokens"], types, strict=True)
        if kind == _USER_DEFINED and tokenizer.token_to_id(token) is not None
    ]
    tokenizer.add_tokens(user_defined)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters: printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
