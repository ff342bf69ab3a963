"""jpeft's GGUF tokenizer against transformers' own (`AutoTokenizer(..., gguf_file=...)`),
on the real SmolLM2 file and on tiny files of both vocabulary kinds written here.

Parity means: the same backend (`tokenizer.json` text), the same ids and decoded text for
every probe text, the same special tokens and BOS/EOS flags, the same chat-template output.
"""

import json

import gguf
import numpy as np
import pytest
import transformers
from tokenizers import pre_tokenizers

import jpeft
from jpeft.hf import gguf_tokenizer

PROBES = [
    "Hello world",
    " leading space, trailing space ",
    "Extract the person as JSON: Now 79, Tane Fernandez is a retired baker living in Seattle.",
    'numbers 0 7 42 1234567 3.14159 -17 1e-5 {"age": 79}',
    "héllo wörld, naïve café, Ångström",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤗🚀👩‍👩‍👧 and symbols ∑∫√ € ©",
    "tabs\tand\nnew\n\nlines\r\n  indented",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> between <|im_end|> special tokens",
    "",
    " ",
]
CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Extract: Ana, 31, Lisbon, nurse."},
        {"role": "assistant", "content": '{"name": "Ana", "age": 31}'},
    ],
    [{"role": "user", "content": "Ünïcödé 🤗 ok?"}],
]


def _reference(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _assert_same_tokenizer(ours, reference, texts, chats=()):
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(
        reference.backend_tokenizer.to_str()
    )
    assert ours.special_tokens_map == reference.special_tokens_map
    assert ours.all_special_ids == reference.all_special_ids
    assert (ours.add_bos_token, ours.add_eos_token) == (
        reference.add_bos_token,
        reference.add_eos_token,
    )
    assert len(ours) == len(reference)
    for text in texts:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True
        ), text
    for chat in chats:
        for prompt in (True, False):
            text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            assert text == reference.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=prompt
            )
            ids = ours.apply_chat_template(chat, tokenize=True, add_generation_prompt=prompt)
            assert ids == reference.apply_chat_template(
                chat, tokenize=True, add_generation_prompt=prompt
            )


def test_smollm2_tokenizer_matches_transformers(smollm2_file):
    ours = gguf_tokenizer.read_tokenizer(smollm2_file)
    reference = _reference(smollm2_file)
    _assert_same_tokenizer(ours, reference, PROBES, CHATS)
    assert ours.chat_template == reference.chat_template
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    # the ids a reader can check by eye: 'Hello' ' ' '1' '2' '3'; specials whole
    assert ours("Hello 123").input_ids == [19556, 216, 33, 34, 35]
    assert ours("<|im_start|>user<|im_end|>").input_ids[::2] == [1, 2]


def test_load_tokenizer_uses_it_and_pads_left(smollm2_file):
    tokenizer = jpeft.models.load_tokenizer(smollm2_file)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["a", "a longer text"], padding=True)
    assert batch.input_ids[0][0] == tokenizer.pad_token_id
    assert batch.attention_mask[0][0] == 0


def _tokenizer_file(
    path,
    model,
    tokens,
    types,
    *,
    scores=None,
    merges=None,
    pre=None,
    add_bos=None,
    chat_template=None,
    special=(1, 2, 0, None),
):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "context_length": 32,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "block_count": 1,
        "head_count": 2,
        "layer_norm_rms_eps": 1e-5,
    }.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, token_id in zip(("bos", "eos", "unk", "pad"), special, strict=True):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A SentencePiece vocabulary: specials, the 256 byte pieces, characters, and merged pieces
# with falling scores (llama.cpp types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte).
_SP_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "a",
    "t",
    "n",
    "he",
    "ll",
    "▁h",
    "▁w",
    "or",
    "hell",
    "▁hell",
    "▁hello",
    "ld",
    "▁wor",
    "▁world",
    "an",
    "▁an",
    "▁and",
    "at",
    "▁th",
    "▁that",
]
_SP_TOKENS = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *_SP_PIECES, "<tool>"]
_SP_TYPES = [2, 3, 3, *[6] * 256, *[1] * len(_SP_PIECES), 4]
_SP_SCORES = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(_SP_PIECES))], 0.0]
SP_PROBES = [
    "hello world",
    "hello  world and that",
    " hello",
    "héllo wörld ✓ 日本",
    "<s>hello</s>",
    "<tool>hello",
    "that\nand\tthat",
    "",
    " ",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token + '[' + m['role'] + '] ' + m['content'] "
    "+ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.mark.parametrize("with_merges", [False, True], ids=["merges-from-scores", "merges"])
def test_sentencepiece_vocabulary_matches_transformers(tmp_path, with_merges):
    merges = None
    if with_merges:
        # the merges a scored vocabulary implies, as llama.cpp writes them for BPE files
        ranked = [
            (left, right)
            for piece in _SP_PIECES
            for i in range(1, len(piece))
            if (left := piece[:i]) in _SP_TOKENS and (right := piece[i:]) in _SP_TOKENS
        ]
        merges = [f"{left} {right}" for left, right in ranked]
    path = _tokenizer_file(
        tmp_path / "sp.gguf",
        "llama",
        _SP_TOKENS,
        _SP_TYPES,
        scores=_SP_SCORES,
        merges=merges,
        chat_template=CHAT_TEMPLATE,
    )
    ours = gguf_tokenizer.read_tokenizer(path)
    _assert_same_tokenizer(ours, _reference(path), SP_PROBES, CHATS)
    assert ours.add_bos_token  # llama.cpp's default for SentencePiece files
    assert ours("hello world").input_ids == [
        1,
        _SP_TOKENS.index("▁hello"),
        _SP_TOKENS.index("▁world"),
    ]
    assert ours.decode(ours("héllo ✓").input_ids, skip_special_tokens=True) == "héllo ✓"


def test_byte_level_vocabulary_with_a_known_split_matches_transformers(tmp_path):
    # `<|endoftext|>` as in every GPT-2-style vocabulary: without it transformers' GPT-2 class
    # appends its default unk token past the model's vocabulary, and jpeft does not copy that
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["Ġh", "he", "ll", "llo", "hello", "Ġhello", "12", "123", "Ġw", "or", "Ġwor"]
    tokens = ["<|endoftext|>", "<|bad control|>", *base, *merged, "€uro", "<think>"]
    types = [3, 3, *[1] * len(base), *[1] * len(merged), 1, 4]
    merges = [
        "Ġ h",
        "h e",
        "l l",
        "ll o",
        "he llo",
        "Ġ hello",
        "1 2",
        "12 3",
        "Ġ w",
        "o r",
        "Ġw or",
    ]
    path = _tokenizer_file(
        tmp_path / "bpe.gguf",
        "gpt2",
        tokens,
        types,
        merges=merges,
        pre="llama-bpe",
        add_bos=False,
        special=(0, 0, None, None),
        chat_template=CHAT_TEMPLATE,
    )
    ours = gguf_tokenizer.read_tokenizer(path)
    probes = [
        "hello world",
        "12345 123 1234",
        "hello<|endoftext|><think>x",
        "€uro € ok",
        "<|bad control|>",
        "a\n\n\nb  c",
        "",
    ]
    _assert_same_tokenizer(ours, _reference(path), probes, CHATS)
    # the control token outside the byte alphabet is a mislabel and stays unadded
    assert "<|bad control|>" not in ours.get_added_vocab()
    # Llama 3's split keeps up to three digits together
    assert ours.convert_ids_to_tokens(ours("12345").input_ids) == ["123", "4", "5"]


def test_a_file_without_a_tokenizer_or_with_another_kind_is_named(tmp_path):
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(jpeft.hf.CheckpointError, match=f"{path}: no tokenizer"):
        jpeft.models.load_tokenizer(path)
    unigram = _tokenizer_file(
        tmp_path / "t5.gguf",
        "t5",
        ["<pad>", "a"],
        [3, 1],
        scores=[0.0, -1.0],
        special=(0, 0, None, None),
    )
    with pytest.raises(ValueError, match=rf"{unigram}: tokenizer.ggml.model 't5'.*'gpt2'"):
        gguf_tokenizer.read_tokenizer(unigram)
    outside = _tokenizer_file(
        tmp_path / "ids.gguf", "gpt2", ["a", "b"], [1, 1], merges=[], special=(7, 1, None, None)
    )
    with pytest.raises(ValueError, match="bos_token_id = 7 is outside the vocabulary of 2"):
        gguf_tokenizer.read_tokenizer(outside)
    short = _tokenizer_file(
        tmp_path / "types.gguf", "gpt2", ["a", "b"], [1], merges=[], special=(0, 1, None, None)
    )
    with pytest.raises(ValueError, match="token_type has 1 entries for 2 tokens"):
        gguf_tokenizer.read_tokenizer(short)
    broken = _tokenizer_file(
        tmp_path / "merges.gguf",
        "gpt2",
        ["a", "b"],
        [1, 1],
        merges=["a c"],
        special=(0, 1, None, None),
    )
    with pytest.raises(ValueError, match=rf"{broken}: the vocabulary and merges do not fit"):
        gguf_tokenizer.read_tokenizer(broken)
