"""Stack Exchange dumps: scores, HTML -> text, pairing, streaming, and hostile XML."""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import pytest

from rlaif.cli import main
from rlaif.data.stackexchange import (
    answer_pairs,
    answer_score,
    html_to_text,
    iter_rows,
    load_questions,
    site_name,
)
from rlaif.errors import UserError


@pytest.fixture()
def coffee(shared_data: Path) -> Path:
    return shared_data / "stackexchange" / "coffee.Posts.xml"


def _row(**attrs: str) -> str:
    return "  <row " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + " />\n"


def _dump(path: Path, rows: list[str]) -> Path:
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "".join(rows) + "</posts>\n"
    )
    return path


# One question (Id 10) whose answers arrive partly BEFORE it in the file, one orphan answer,
# and a question with a single answer (no pair possible).
SMALL = [
    _row(Id="11", PostTypeId="2", ParentId="10", Score="3", Body="&lt;p&gt;Three up&lt;/p&gt;"),
    _row(
        Id="10",
        PostTypeId="1",
        AcceptedAnswerId="14",
        Score="5",
        Title="Why &amp; how?",
        Body="&lt;p&gt;Body &amp;amp; more&lt;/p&gt;",
    ),
    _row(Id="12", PostTypeId="2", ParentId="10", Score="3", Body="&lt;p&gt;Also three&lt;/p&gt;"),
    _row(Id="13", PostTypeId="2", ParentId="10", Score="-2", Body="&lt;p&gt;Down&lt;/p&gt;"),
    _row(Id="14", PostTypeId="2", ParentId="10", Score="10", Body="&lt;p&gt;Accepted&lt;/p&gt;"),
    _row(Id="20", PostTypeId="1", Score="1", Title="Lonely", Body="&lt;p&gt;q&lt;/p&gt;"),
    _row(Id="21", PostTypeId="2", ParentId="20", Score="1", Body="&lt;p&gt;only one&lt;/p&gt;"),
    _row(Id="31", PostTypeId="2", ParentId="999", Score="4", Body="&lt;p&gt;orphan&lt;/p&gt;"),
    _row(Id="32", PostTypeId="2", ParentId="999", Score="0", Body="&lt;p&gt;orphan 2&lt;/p&gt;"),
]


@pytest.mark.parametrize(
    ("votes", "accepted", "expected"),
    [
        (0, False, 0),  # log2(1) = 0
        (1, False, 1),  # log2(2) = 1
        (2, False, 2),  # log2(3) = 1.58 -> 2
        (4, False, 2),  # log2(5) = 2.32 -> 2
        (10, False, 3),  # log2(11) = 3.46 -> 3
        (10, True, 4),  # +1 accepted
        (34, False, 5),  # log2(35) = 5.13 -> 5
        (0, True, 1),
        (-1, False, -1),  # negative votes: log term 0, then -1
        (-3, True, 0),  # accepted but down-voted
    ],
)
def test_answer_score(votes: int, accepted: bool, expected: int) -> None:
    assert answer_score(votes, accepted) == expected


def test_html_to_text() -> None:
    body = (
        "<p>Use &lt;b&gt; &amp; grind.</p>\n<ul><li>one</li><li>two</li></ul>"
        "<pre><code>x  =  1\ny = 2</code></pre><p>a<br>b <img src='u' alt='pic'></p>"
    )
    assert html_to_text(body) == "Use <b> & grind.\n\n- one\n- two\n\nx  =  1\ny = 2\n\na\nb [pic]"


def test_site_name() -> None:
    assert site_name(Path("coffee.Posts.xml")) == "coffee"
    assert site_name(Path("dumps/coffee.stackexchange.com/Posts.xml")) == "coffee"
    assert site_name(Path("x/cooking.Posts.xml.gz")) == "cooking"


def test_load_questions_real_dump(coffee: Path) -> None:
    qs = load_questions(coffee)
    assert len(qs) == 225
    assert qs[0]["id"] == "1"
    assert qs[0]["title"] == "How should I store whole bean coffee?"
    assert qs[0]["text"].startswith("How should I store whole bean coffee?\n\nI just got a pound")
    assert all("<p>" not in q["text"] and "&lt;" not in q["text"] for q in qs)
    assert [q["id"] for q in load_questions(coffee, limit=3)] == ["1", "2", "3"]


def test_pairs_by_hand(tmp_path: Path) -> None:
    dump = _dump(tmp_path / "tiny.Posts.xml", SMALL)
    # scores: 11 -> 2, 12 -> 2, 13 -> -1, 14 -> round(log2 11) + 1 = 4; 11 and 12 tie.
    pairs = answer_pairs(dump, max_per_question=0)
    got = sorted(p["id"] for p in pairs)
    assert got == sorted(
        f"se:tiny:10:{a}>{b}" for a, b in [(14, 11), (14, 12), (14, 13), (11, 13), (12, 13)]
    )
    p = next(p for p in pairs if p["id"] == "se:tiny:10:14>13")
    assert p["prompt"] == [{"role": "user", "content": "Why & how?\n\nBody & more"}]
    assert (p["chosen"], p["rejected"]) == ("Accepted", "Down")
    assert (p["chosen_score"], p["rejected_score"], p["p_chosen"]) == (4, -1, 1.0)
    assert p["source"] == "human:stackexchange:tiny"
    capped = answer_pairs(dump, max_per_question=2, seed=1)
    assert len(capped) == 2 and {c["id"] for c in capped} <= set(got)


def test_pairs_real_dump(coffee: Path, tmp_path: Path) -> None:
    pairs = answer_pairs(coffee, max_per_question=4, seed=0)
    assert len(pairs) == 108  # 72 questions with answers of different scores
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    per_q: dict[str, int] = {}
    for p in pairs:
        qid = p["id"].split(":")[2]
        per_q[qid] = per_q.get(qid, 0) + 1
    assert max(per_q.values()) <= 4
    assert answer_pairs(coffee, seed=0) == pairs  # seeded: same pairs again
    assert {p["id"] for p in answer_pairs(coffee, seed=5)} != {p["id"] for p in pairs}
    # many dumps, one of them gzipped: pairs from each, tagged by site
    other = tmp_path / "tea.Posts.xml.gz"
    with open(coffee, "rb") as src, gzip.open(other, "wb") as dst:
        shutil.copyfileobj(src, dst)
    both = answer_pairs([coffee, other], max_per_question=4, seed=0)
    assert len(both) == 216
    assert {p["source"] for p in both} == {"human:stackexchange:coffee", "human:stackexchange:tea"}


def test_truncated_xml(coffee: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.Posts.xml"
    bad.write_bytes(coffee.read_bytes()[:20000])
    with pytest.raises(UserError, match=r"cut\.Posts\.xml:\d+: malformed XML"):
        answer_pairs(bad)
    with pytest.raises(UserError, match="malformed XML"):
        list(iter_rows(bad))


BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<posts><row Id="1" PostTypeId="1" Title="&lol9;" Body="x" /></posts>
"""

EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE posts [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<posts><row Id="1" PostTypeId="1" Title="&xxe;" Body="x" /></posts>
"""


@pytest.mark.parametrize("text", [BOMB, EXTERNAL], ids=["billion-laughs", "external-entity"])
def test_hostile_xml_refused(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "evil.Posts.xml"
    bad.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"evil\.Posts\.xml: refused to parse XML"):
        load_questions(bad)
    assert time.perf_counter() - t0 < 2.0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pmp_pairs.jsonl").write_text("kept\n")
    rc = main(["reward", "pmp-data", str(bad), "run_dir=run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "evil.Posts.xml" in err[0] and "Traceback" not in err[0]
    assert (tmp_path / "run" / "pmp_pairs.jsonl").read_text() == "kept\n"  # left as it was


def test_truncated_xml_cli(
    coffee: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "cut.Posts.xml"
    bad.write_bytes(coffee.read_bytes()[:5000])
    rc = main(["reward", "pmp-data", str(bad), f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cut.Posts.xml:" in err[0]
    assert not (tmp_path / "run" / "pmp_pairs.jsonl").exists()


def test_pmp_data_cli(coffee: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["reward", "pmp-data", str(coffee), f"run_dir={tmp_path}", "reward.pmp_max_per_question=1"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "questions_paired: 72" in out and "pairs: 72" in out
    lines = (tmp_path / "pmp_pairs.jsonl").read_text().splitlines()
    assert len(lines) == 72


def test_rows_are_released(tmp_path: Path) -> None:
    """Streaming: the parser's tree does not keep finished rows (constant memory)."""
    import tracemalloc

    def peak(n: int) -> int:
        body = "x" * 2000
        rows = [_row(Id=str(i), PostTypeId="1", Title="t", Body=body) for i in range(n)]
        path = _dump(tmp_path / f"big{n}.Posts.xml", rows)
        tracemalloc.start()
        for _ in iter_rows(path):
            pass
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(500), peak(5000)  # 1 MB vs 10 MB of XML
    assert large < 2 * small + 500_000
