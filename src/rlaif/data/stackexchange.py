"""Stack Exchange data dumps (``Posts.xml``): questions as prompts, scored answer pairs for PMP.

Dumps are read streaming with ``iterparse`` from defusedxml (DTDs, entity declarations and external
references are refused, so an entity-expansion bomb fails at once instead of eating memory), and
every parsed ``<row>`` is cleared right away, so memory does not grow with the file.

Answer scores follow Askell et al. (2021): ``round(log2(1 + votes))``, +1 if the answer is the
accepted one, -1 if its votes are negative. The log is only defined for votes > -1, so for a
negative vote count the log term is taken as 0 (as if it had no votes) and the -1 applies: a
down-voted answer scores -1 (0 if it was nevertheless accepted).

Pairing needs all answers of a question together, but in a dump an answer can come years (and
gigabytes) after its question. :func:`iter_answer_pairs` therefore spools the rows of each file
into a temporary SQLite database on disk (raw HTML, ids, votes) and then walks it one question at a
time: memory stays constant, disk use is about the size of the dump.
"""

from __future__ import annotations

import bz2
import gzip
import math
import random
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any
from xml.etree.ElementTree import Element, ParseError

from rlaif.errors import UserError

QUESTION, ANSWER = "1", "2"
_BLOCK = {"p", "div", "pre", "blockquote", "ul", "ol", "table", "tr", "h1", "h2", "h3", "h4", "h5"}
_BLOCK |= {"h6", "hr"}


# ---------------------------------------------------------------------------- HTML -> text


class _TextExtractor(HTMLParser):
    """Collects the visible text of a post body: paragraphs, list items, code kept verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self.parts.append("\n\n")
        if tag == "pre":
            self.pre += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag == "img":
            alt = dict(attrs).get("alt") or "image"
            self.parts.append(f"[{alt}]")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(body: str) -> str:
    """Plain text of an HTML post body: tags dropped, entities decoded, paragraphs kept apart."""
    parser = _TextExtractor()
    parser.feed(body)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------------------- scores


def answer_score(votes: int, accepted: bool) -> int:
    """Askell et al.'s PMP score; negative votes count as 0 in the log (see the module doc)."""
    score = round(math.log2(1 + max(votes, 0)))
    if accepted:
        score += 1
    if votes < 0:
        score -= 1
    return score


# ---------------------------------------------------------------------------- streaming rows


def site_name(path: Path) -> str:
    """'coffee' for coffee.Posts.xml or for coffee.stackexchange.com/Posts.xml."""
    name = path.name
    for suffix in (".gz", ".bz2", ".xml"):
        name = name.removesuffix(suffix)
    if name.lower() != "posts":
        return re.sub(r"\.?posts$", "", name, flags=re.IGNORECASE) or name
    return path.parent.name.split(".")[0] or "site"


def _open(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith(".bz2"):
        return bz2.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """Yield the attributes of every ``<row>`` of a Posts.xml (.xml, .xml.gz or .xml.bz2).

    Raises :class:`UserError` (one line, naming the file and line) on malformed XML, on any DTD or
    entity declaration, or when the file cannot be read.
    """
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import iterparse

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Stack Exchange dump not found")
    try:
        with _open(path) as fh:
            events = iterparse(fh, events=("start", "end"), forbid_dtd=True)
            root: Element | None = None
            for event, elem in events:
                if event == "start":
                    if root is None:
                        root = elem
                    continue
                if elem.tag == "row":
                    yield dict(elem.attrib)
                    elem.clear()
                    if root is not None:
                        root.clear()  # drop finished rows so memory stays flat
    except ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else "?"
        msg = str(exc).split(":")[0]
        raise UserError(f"{path}:{line}: malformed XML ({msg})") from None
    except DefusedXmlException as exc:
        raise UserError(
            f"{path}: refused to parse XML with a DTD or entity declarations "
            f"({exc.__class__.__name__}); Stack Exchange dumps have none"
        ) from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None


def _int(row: dict[str, str], key: str, path: Path, default: int | None = None) -> int:
    value = row.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(
            f"{path}: row Id={row.get('Id', '?')}: attribute {key}={value!r} is not an integer"
        ) from None


def question_text(title: str, body_html: str) -> str:
    """The question as plain text: title, blank line, body."""
    body = html_to_text(body_html)
    return f"{title.strip()}\n\n{body}".strip()


def load_questions(path: Path, limit: int = 0) -> list[dict[str, Any]]:
    """Questions of one Posts.xml in file order: ``{"id", "title", "text"}``, at most ``limit``.

    ``text`` is the title, a blank line and the body as plain text; ``id`` is the post Id (str).
    Stops reading as soon as ``limit`` questions (0: all) are found.
    """
    out: list[dict[str, Any]] = []
    for row in iter_rows(path):
        if row.get("PostTypeId") != QUESTION:
            continue
        title = row.get("Title", "")
        text = question_text(title, row.get("Body", ""))
        if not text:
            continue
        out.append({"id": row.get("Id", ""), "title": title.strip(), "text": text})
        if limit and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------- answer pairs


_SCHEMA = """
CREATE TABLE q (id INTEGER PRIMARY KEY, accepted INTEGER, title TEXT, body TEXT);
CREATE TABLE a (id INTEGER PRIMARY KEY, parent INTEGER, votes INTEGER, body TEXT);
"""


def _spool(path: Path, db: sqlite3.Connection, chunk: int = 2000) -> tuple[int, int]:
    """Copy the questions and answers of ``path`` into ``db``; return (questions, answers)."""
    qs: list[tuple[int, int | None, str, str]] = []
    ans: list[tuple[int, int, int, str]] = []
    nq = na = 0
    from rlaif.progress import progress

    for row in progress(
        iter_rows(path), desc=f"read {path.name}", unit=" rows", leave=False, delay=2.0
    ):
        kind = row.get("PostTypeId")
        if kind == QUESTION:
            acc = row.get("AcceptedAnswerId")
            qs.append(
                (
                    _int(row, "Id", path),
                    _int(row, "AcceptedAnswerId", path) if acc else None,
                    row.get("Title", ""),
                    row.get("Body", ""),
                )
            )
        elif kind == ANSWER and row.get("ParentId"):
            votes = _int(row, "Score", path, default=0)
            ans.append(
                (_int(row, "Id", path), _int(row, "ParentId", path), votes, row.get("Body", ""))
            )
        if len(qs) >= chunk:
            db.executemany("INSERT OR REPLACE INTO q VALUES (?,?,?,?)", qs)
            nq, qs = nq + len(qs), []
        if len(ans) >= chunk:
            db.executemany("INSERT OR REPLACE INTO a VALUES (?,?,?,?)", ans)
            na, ans = na + len(ans), []
    db.executemany("INSERT OR REPLACE INTO q VALUES (?,?,?,?)", qs)
    db.executemany("INSERT OR REPLACE INTO a VALUES (?,?,?,?)", ans)
    db.commit()
    return nq + len(qs), na + len(ans)


def pairs_for_question(
    scored: list[tuple[int, int]], max_pairs: int, rng: random.Random
) -> list[tuple[int, int]]:
    """Index pairs (better, worse) of answers with different scores, at most ``max_pairs``.

    ``scored`` is a list of (answer id, score). All unequal pairs are listed in a fixed order,
    shuffled with ``rng`` and cut to ``max_pairs`` (0: no cap).
    """
    pairs: list[tuple[int, int]] = []
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            si, sj = scored[i][1], scored[j][1]
            if si != sj:
                pairs.append((i, j) if si > sj else (j, i))
    rng.shuffle(pairs)
    return pairs[:max_pairs] if max_pairs > 0 else pairs


def iter_answer_pairs(
    paths: Iterable[str | Path],
    *,
    max_per_question: int = 4,
    seed: int = 0,
    stats: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream PMP pairs from one or many Posts.xml files (see :func:`answer_pairs`).

    ``stats`` (if given) receives counts: files, questions, answers, questions_paired, pairs.
    """
    counts = stats if stats is not None else {}
    for key in ("files", "questions", "answers", "questions_paired", "pairs"):
        counts.setdefault(key, 0)
    for raw in paths:
        path = Path(raw)
        site = site_name(path)
        with tempfile.TemporaryDirectory(prefix="rlaif-se-") as tmp:
            db = sqlite3.connect(str(Path(tmp) / "posts.db"))
            try:
                db.executescript(_SCHEMA)
                nq, na = _spool(path, db)
                db.execute("CREATE INDEX a_parent ON a(parent)")
                counts["files"] += 1
                counts["questions"] += nq
                counts["answers"] += na
                yield from _pairs_from_db(db, site, max_per_question, seed, counts)
            finally:
                db.close()


def _pairs_from_db(
    db: sqlite3.Connection, site: str, cap: int, seed: int, counts: dict[str, int]
) -> Iterator[dict[str, Any]]:
    parents = db.execute(
        "SELECT q.id, q.accepted, q.title, q.body FROM q JOIN "
        "(SELECT parent FROM a GROUP BY parent HAVING COUNT(*) >= 2) p ON p.parent = q.id "
        "ORDER BY q.id"
    )
    for qid, accepted, title, body in parents.fetchall():
        answers = db.execute(
            "SELECT id, votes, body FROM a WHERE parent = ? ORDER BY id", (qid,)
        ).fetchall()
        scored = [(aid, answer_score(votes, aid == accepted)) for aid, votes, _ in answers]
        rng = random.Random(f"{seed}:{site}:{qid}")
        chosen_pairs = pairs_for_question(scored, cap, rng)
        if not chosen_pairs:
            continue
        prompt = [{"role": "user", "content": question_text(title or "", body)}]
        texts = {i: html_to_text(answers[i][2]) for pair in chosen_pairs for i in pair}
        made = 0
        for better, worse in chosen_pairs:
            if not texts[better] or not texts[worse]:
                continue
            made += 1
            yield {
                "id": f"se:{site}:{qid}:{scored[better][0]}>{scored[worse][0]}",
                "prompt": prompt,
                "chosen": texts[better],
                "rejected": texts[worse],
                "chosen_score": scored[better][1],
                "rejected_score": scored[worse][1],
                "p_chosen": 1.0,
                "source": f"human:stackexchange:{site}",
            }
        counts["pairs"] += made
        counts["questions_paired"] += 1 if made else 0


def answer_pairs(
    paths: str | Path | Iterable[str | Path], *, max_per_question: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """Pairs of answers to the same question with different PMP scores, from Posts.xml dumps.

    Each pair: ``{"id", "prompt": [user message], "chosen", "rejected", "chosen_score",
    "rejected_score", "p_chosen": 1.0, "source": "human:stackexchange:<site>"}``; ``chosen`` has
    the higher score. At most ``max_per_question`` pairs per question (0: all), drawn with a
    generator seeded by (seed, site, question id), so the result does not depend on file order.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    return list(iter_answer_pairs(paths, max_per_question=max_per_question, seed=seed))
