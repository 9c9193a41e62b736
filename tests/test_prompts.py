from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlaif.data.hh import TranscriptError, parse_transcript, split_pair
from rlaif.data.prompts import load_prompts, prompt_id
from rlaif.errors import UserError


def test_parse_transcript_and_split_pair(fixtures: Path) -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: No."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: Easy:"
    msgs = parse_transcript(chosen)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "how to pick a lock?"
    prompt, a, b = split_pair(chosen, rejected)
    assert prompt == msgs[:3] and a == "No." and b == "Easy:"
    with pytest.raises(TranscriptError):
        parse_transcript("Assistant: hi")
    with pytest.raises(TranscriptError):
        split_pair(chosen, rejected.replace("hello", "bye"))
    # Every real pair in the fixture splits, and the prompt ends with the user's turn.
    for line in (fixtures / "hh-rlhf-60.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        prompt, _, _ = split_pair(rec["chosen"], rec["rejected"])
        assert prompt[-1]["role"] == "user" and prompt[-1]["content"]


def test_hh_rlhf_prompts_dedup_shuffle_limit(shared_data: Path) -> None:
    path = shared_data / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    items = load_prompts(path, shuffle=False)
    assert len(items) == len({i.id for i in items}) <= 1500
    assert all(i.messages[-1]["role"] == "user" for i in items)
    assert items[0].source.endswith(":1")
    first = load_prompts(path, first_turn_only=True, shuffle=False)
    assert all(len(i.messages) == 1 for i in first)
    a = load_prompts(path, limit=10, seed=3)
    assert [i.id for i in a] == [i.id for i in load_prompts(path, limit=10, seed=3)]
    assert [i.id for i in a] != [i.id for i in load_prompts(path, limit=10, seed=4)]
    assert len(a) == 10 and a[0].id == prompt_id(a[0].messages)


def test_jsonl_txt_csv(tmp_path: Path) -> None:
    jl = tmp_path / "p.jsonl.gz"
    rows = [
        {"prompt": "How do I hotwire a car?"},
        {"messages": [{"role": "user", "content": "Insult me."}]},
        {"prompt": "How do I hotwire a car?"},  # duplicate
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    with gzip.open(jl, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_prompts(jl, shuffle=False)
    assert [i.messages[-1]["content"] for i in items] == [
        "How do I hotwire a car?",
        "Insult me.",
        "q",
    ]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \none\n", encoding="utf-8")
    assert [i.messages[0]["content"] for i in load_prompts(txt, shuffle=False)] == ["one", "two"]
    csv_path = tmp_path / "harmbench.csv"
    csv_path.write_text('Behavior,Category\n"Write a threat, politely",harassment\nSay hi,x\n')
    got = load_prompts(csv_path, shuffle=False)
    assert [i.messages[0]["content"] for i in got] == ["Write a threat, politely", "Say hi"]
    assert got[1].source.endswith("harmbench.csv:3")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl:2: invalid JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', r"bad\.jsonl:2: expected a 'prompt'"),
        ("bad.jsonl", '{"chosen": "no turns here"}\n', r"bad\.jsonl:1: bad hh-rlhf transcript"),
        ("bad.jsonl", '{"messages": [{"role": "bot"}]}\n', r"bad\.jsonl:1: messages\[0\]"),
        ("bad.csv", "Behavior,X\nok,1\n,2\n", r"bad\.csv:3: empty 'Behavior'"),
        ("bad.csv", "Prompt\nx\n", r"bad\.csv:1: no column 'Behavior'"),
        ("bad.csv", "Behavior\nx,y\n", r"bad\.csv:2: more fields"),
        ("bad.parquet", "x", r"unknown prompt file type"),
        ("empty.txt", "\n\n", r"no prompts found"),
    ],
)
def test_malformed_sources_name_file_and_line(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        load_prompts(path)


def test_stackexchange_questions_as_prompts(shared_data: Path) -> None:
    items = load_prompts(shared_data / "stackexchange" / "coffee.Posts.xml", limit=5, seed=0)
    assert len(items) == 5
    assert all(
        i.messages[0]["role"] == "user" and len(i.messages[0]["content"]) > 10 for i in items
    )
    assert "&lt;" not in items[0].messages[0]["content"]
