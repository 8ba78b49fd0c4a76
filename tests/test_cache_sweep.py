"""``run_sweep``: the policy x budget table, JSON and plot; kept-position statistics."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import longseq
from longseq.cache import TOVA, Full, Window
from longseq.sweep import kept_position_stats, run_sweep, score_document


def tiny():
    torch.manual_seed(0)
    return longseq.build_model("transformer", "tiny", d_model=32).double().eval()


DOCS = [
    ("alpha", b"bounded caches turn transformers into multi-state rnns. " * 2),
    ("beta", torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)),
]


def test_run_sweep_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny()
    lines: list[str] = []
    res = run_sweep(
        model,
        DOCS,
        ["tova", "window", "sink:sinks=2", "full"],
        [128, 8, 16],
        chunk_size=37,
        out_dir=tmp_path,
        progress=lines.append,
    )
    assert res.policies == ["tova", "window", "sink:sinks=2"] and res.budgets == [8, 16, 128]
    assert len(lines) == 2 * (3 * 3 + 1)

    # Full == the plain no-cache loss, summed over both documents.
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for _, doc in DOCS:
            ids = torch.tensor(list(doc)) if isinstance(doc, bytes) else doc.long()
            logits = model(ids[None])[0]
            nats += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
            tokens += ids.numel() - 1
    assert res.full is not None and res.full.tokens == tokens
    assert math.isclose(res.full.nats, nats, rel_tol=1e-10)
    assert math.isclose(res.value("full", None, "bpb"), nats / tokens / math.log(2), rel_tol=1e-10)
    # a budget above every document length never evicts: equal to Full
    assert math.isclose(res.value("tova", 128, "loss"), nats / tokens, rel_tol=1e-10)
    assert not math.isclose(res.value("window", 8, "loss"), nats / tokens, rel_tol=1e-6)

    md = (tmp_path / "sweep.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0].replace(" ", "") == "|policy|8|16|128|full|"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["tova", "window", "sink:sinks=2"]
    assert all(len(row.strip("|").split("|")) == 5 for row in table)
    assert table[2].split("|")[-2].strip() == f"{res.full.ppl:.4f}"

    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["budgets"] == [8, 16, 128] and set(data["scores"]) == {"tova", "window", "sink:sinks=2"}
    assert set(data["scores"]["tova"]) == {"8", "16", "128"}
    assert math.isclose(data["full"]["loss"], nats / tokens, rel_tol=1e-10)
    assert set(data["per_document"]) == {"alpha", "beta"}
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert set(res.files) == {"markdown", "json", "plot"}


def test_sweep_numbers_do_not_depend_on_the_chunk_size():
    model = tiny()
    ids = torch.tensor(list(DOCS[0][1]))
    a = score_document(model, ids, TOVA(9), chunk_size=1)
    b = score_document(model, ids, TOVA(9), chunk_size=50)
    assert a.tokens == b.tokens == ids.numel() - 1 and math.isclose(a.nats, b.nats, rel_tol=1e-10)


def test_sweep_rejects_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="metric"):
        run_sweep(model, DOCS, ["tova"], [8], metric="acc")
    with pytest.raises(ValueError, match="budget"):
        run_sweep(model, DOCS, ["tova"], [0])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        run_sweep(model, [("x", b"a")], ["tova"], [8])


def test_kept_position_stats():
    model = tiny()
    doc = DOCS[0][1]
    window = kept_position_stats(model, doc, Window(8), recent=(1, 8, 16), every=10)
    assert len(window) == 2 and all(s.samples > 0 for s in window)
    for s in window:
        assert (
            s.first_token == 0.0 and s.recent[1] == 1.0 and s.recent[8] == 1.0 and 0.5 <= s.recent[16] < 1.0
        )
        assert s.mean_age == pytest.approx(3.5)
    full = kept_position_stats(model, doc, Full(), recent=(4,), every=25)
    assert all(s.first_token == 1.0 and s.recent[4] == 1.0 for s in full)
    tova = kept_position_stats(model, doc, "tova_head:8", every=10)
    assert all(0.0 <= s.first_token <= 1.0 and 0 < s.recent[1] <= 1.0 for s in tova)


def test_kept_position_stats_of_megabyte_count_patches_in_the_global_layers():
    """MEGABYTE's global caches keep patch positions: after 256 bytes (P = 4) the global layers have taken 65 patch
    positions (the pads' 0, then one per input patch), so a Window of 8 keeps the 8 latest patches (mean age 3.5
    patches, the latest always kept), and statistics start once more than 8 patches have come. The local layers'
    per-patch caches, which no policy bounds, are not reported."""
    model = longseq.build_model("megabyte", "tiny").eval()
    P, n_global = model.config.patch_size, model.config.n_global_layers
    assert P == 4
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0))
    stats = kept_position_stats(model, ids, Window(8), every=16, recent=(1, 8))
    assert [s.layer for s in stats] == list(range(n_global))
    for s in stats:
        # 16-byte chunks: one sample after each from 32 bytes on (9 patch positions, one evicted) to 256 (65)
        assert s.samples == sum(1 for n in range(16, 257, 16) if n // P + 1 > 8) == 15
        assert s.first_token == 0.0 and s.recent[1] == 1.0 and s.recent[8] == 1.0
        assert s.mean_age == pytest.approx(3.5)


def test_score_document_takes_byte_ids_of_any_integer_dtype():
    """Byte ids as a memory-mapped corpus gives them (uint8) score as int64 ids do; float ids are refused."""
    model = tiny()
    ids = torch.tensor(list(b"the cat sat on the mat, the cat sat"), dtype=torch.long)
    want = score_document(model, ids, Window(8), chunk_size=7)
    got = score_document(model, ids.to(torch.uint8), Window(8), chunk_size=7)
    assert got.tokens == want.tokens == ids.numel() - 1 and got.nats == want.nats
    with pytest.raises(ValueError, match=r"ids must be a \[T\] integer tensor; got shape \(35,\), dtype torch.float32"):
        score_document(model, ids.float(), Window(8))


def test_run_sweep_refuses_an_out_dir_it_cannot_fill_before_scoring(tmp_path):
    """A file at out_dir or above it, and a folder where one of the sweep's files goes, are refused before any
    scoring (no progress line) and without writing anything."""
    model = tiny()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "taken" / "sweep.json").mkdir(parents=True)
    cases = [
        (tmp_path / "a_file", NotADirectoryError, "is a file, not a folder for sweep.md"),
        (tmp_path / "a_file" / "sub", NotADirectoryError, f"{tmp_path / 'a_file'} is a file, so no folder"),
        (tmp_path / "taken", IsADirectoryError, "sweep.json there is a folder, where a file would be written"),
    ]
    for out_dir, error, message in cases:
        lines: list[str] = []
        with pytest.raises(error, match=re.escape(message)):
            run_sweep(model, DOCS, ["window"], [8], out_dir=out_dir, progress=lines.append)
        assert lines == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["sweep.json"]
