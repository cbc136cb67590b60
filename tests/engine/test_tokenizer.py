import pytest

from glmpool.engine.tokenizer import build_chat_prompt, process_response


@pytest.fixture(scope="module")
def tok(tiny_engine):
    return tiny_engine.tokenizer


ROUND_TRIPS = ["我喜欢吃橘子，你呢？", "Hello world", "mixed 中文 and English 123", "emoji 😀🎉 ok",
               "line one\nline two\n\nend", "tab\there\t\tx", "", "a", "   leading and trailing   "]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(tok, text):
    decoded = tok.decode(tok.encode(text))
    # SentencePiece normalises full-width punctuation (NFKC) and its dummy prefix eats a leading space.
    expected = text.replace("，", ",").replace("？", "?")
    assert decoded == expected.lstrip(" ") or decoded == expected


@pytest.mark.parametrize("spaces", list(range(2, 101)))
def test_runs_of_spaces(tok, spaces):
    text = "a" + " " * spaces + "b"
    ids = tok.encode(text)
    blanks = [tok.id_piece(i) for i in ids if tok.id_piece(i).startswith("<|blank_")]
    expected, left = [], spaces  # greedy from the longest: 100 -> 80 + 20; 81 -> 80 + a plain space
    while left >= 2:
        expected.append(min(left, 80))
        left -= expected[-1]
    assert [int(p[8:-2]) for p in blanks] == expected
    assert tok.decode(ids) == text


def test_whitespace_tokens(tok):
    assert tok.id_piece(4) == "<n>"
    assert tok.piece_id("<n>") in tok.encode("a\nb")
    assert tok.piece_id("<|tab|>") in tok.encode("a\tb")
    assert tok.piece_id("<|blank_80|>") in tok.encode("x" + " " * 80)


def test_prompt_ends_with_gmask_sop(tok):
    ids = tok.encode_prompt("你好")
    assert ids[-2:] == [tok.gmask_id, tok.bos_id]
    assert ids[:-2] == tok.encode("你好")
    assert tok.encode_prompt("") == [tok.gmask_id, tok.bos_id]


def test_literal_special_tokens(tok):
    # <sop> <eop> <unk> <pad> [MASK] in user text are special tokens, whitespace around them stripped.
    # Newlines, tabs and runs of spaces are tokens of their own (<n>, <|tab|>, <|blank_n|>): stripped, none is left.
    for special in ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]"):
        ids = tok.encode(f"x \n\t  {special}\n  \ty")
        assert [tok.id_piece(i) for i in ids] == ["▁", "<0x78>", special, "▁", "y"], special
    # literal [gMASK] is plain text for the reference tokenizer
    assert tok.gmask_id not in tok.encode("a [gMASK] b")
    assert tok.decode(tok.encode("a [gMASK] b")) == "a [gMASK] b"


def test_num_image_tokens_offset(tiny_dir, tmp_path):
    import json
    import shutil
    from glmpool.engine import ChatGLMTokenizer
    shutil.copy(tiny_dir / "ice_text.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    shifted = ChatGLMTokenizer.from_dir(tmp_path)
    plain = ChatGLMTokenizer.from_dir(tiny_dir)
    text = "橘子 and apples\n"
    assert shifted.encode(text) == [i + 20000 for i in plain.encode(text)]
    assert shifted.decode(shifted.encode(text)) == plain.decode(plain.encode(text))
    assert shifted.bos_id == plain.bos_id + 20000


def test_decode_cleans_spaces_before_punctuation(tok):
    assert tok.decode(tok.encode("Hello , world !")) == "Hello, world!"
    assert tok.decode(tok.encode("is n't it ?")) == "isn't it?"


def test_decode_drops_pad_and_control(tok):
    ids = tok.encode("abc")
    assert tok.decode([tok.pad_id] + ids + [tok.eos_id]) == tok.decode(ids)


def test_chat_prompt_format():
    assert build_chat_prompt("你好") == "你好"
    assert build_chat_prompt("你好", []) == "你好"
    history = [("q0", "a0"), ("q1", "a1")]
    assert build_chat_prompt("q2", history) == (
        "[Round 0]\n问：q0\n答：a0\n[Round 1]\n问：q1\n答：a1\n[Round 2]\n问：q2\n答：")


@pytest.mark.parametrize("raw, expected", [
    ("  hi  ", "hi"),
    ("现在是[[训练时间]]", "现在是2023年"),
    ("你好,世界!", "你好，世界！"),
    ("问题:答案;对吗?", "问题：答案；对吗？"),
    ("hello, world!", "hello, world!"),  # no CJK neighbour: untouched
    ("好,ok", "好，ok"),
    ("ok,好", "ok，好"),
])
def test_process_response(raw, expected):
    assert process_response(raw) == expected
