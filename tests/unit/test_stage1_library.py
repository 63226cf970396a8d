"""Stage 1's Ray-free pieces on the embedded MiniLM: the frozen encodings kept per machine."""

import pytest
import torch

from allmrec.models.alignment import CollabTextAligner
from allmrec.text_encoder import load_sentence_encoder
from allmrec.training.stage1 import (
    encode_texts,
    frozen_text_encodings,
    frozen_text_encodings_of,
)

TEXTS = ["Toy Story (1995), Animation", "Heat (1995), Action", "Fargo (1996), Crime"]


@pytest.fixture(scope="module")
def aligner():
    torch.set_num_threads(1)
    encoder = load_sentence_encoder("embedded:all-MiniLM-L6-v2")
    return CollabTextAligner(encoder, 50, int(encoder.get_embedding_dimension()))


def test_frozen_encodings_are_computed_once_and_read_back_exactly(aligner, tmp_path):
    expected = encode_texts(aligner.text_encoder, TEXTS, "cpu", max_tokens=128)
    first = frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 128, tmp_path)
    [kept] = tmp_path.glob("*.safetensors")
    stamp = kept.stat().st_mtime_ns
    second = frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 128, tmp_path)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert kept.stat().st_mtime_ns == stamp  # read, not written again
    assert list(tmp_path.glob("*.partial")) == []


def test_another_text_limit_or_encoder_is_another_entry(aligner, tmp_path):
    frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 128, tmp_path)
    frozen_text_encodings(aligner.text_encoder, TEXTS[:2], "cpu", 128, tmp_path)
    frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 8, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # A fine-tuned encoder's weights differ: its encodings are not the kept ones.
    weight = next(aligner.text_encoder.parameters())
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01)
    try:
        changed = frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 128, tmp_path)
        assert len(list(tmp_path.glob("*.safetensors"))) == 4
        assert torch.equal(
            changed, encode_texts(aligner.text_encoder, TEXTS, "cpu", max_tokens=128)
        )
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_no_cache_computes(aligner):
    assert torch.equal(
        frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 128, None),
        encode_texts(aligner.text_encoder, TEXTS, "cpu", max_tokens=128),
    )


def test_a_bfloat16_encoder_is_kept_under_its_own_key(aligner, tmp_path):
    """The GPU profile's encoder weights are bfloat16, which numpy cannot hold."""
    import copy

    half = copy.deepcopy(aligner).to(torch.bfloat16)
    q = frozen_text_encodings(half.text_encoder, TEXTS, "cpu", 128, tmp_path)
    frozen_text_encodings(aligner.text_encoder, TEXTS, "cpu", 128, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(q, frozen_text_encodings(half.text_encoder, TEXTS, "cpu", 128, tmp_path))


def test_a_named_frozen_encoder_is_read_back_without_loading_it(aligner, tmp_path, monkeypatch):
    """A Stage 1 worker's path: the q_i of `data.text_encoder` are kept by the model folder's
    files, and read back without the encoder (nor sentence-transformers) being loaded."""
    import allmrec.training.stage1 as stage1

    name = "embedded:all-MiniLM-L6-v2"
    first = frozen_text_encodings_of(name, TEXTS, "cpu", 128, tmp_path)
    assert torch.equal(first, encode_texts(aligner.text_encoder, TEXTS, "cpu", max_tokens=128))

    def no_loading(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(stage1, "load_sentence_encoder", no_loading)
    assert torch.equal(frozen_text_encodings_of(name, TEXTS, "cpu", 128, tmp_path), first)
    with pytest.raises(AssertionError, match="was loaded"):  # another dtype: another entry
        frozen_text_encodings_of(name, TEXTS, "cpu", 128, tmp_path, dtype=torch.bfloat16)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


_ACROSS_WORKERS = """
import json
import sys
import torch
import torch.distributed as dist
from allmrec.text_encoder import load_sentence_encoder
from allmrec.training.stage1 import encode_across_workers

rank, out, texts = int(sys.argv[1]), sys.argv[2], json.loads(open(sys.argv[4]).read())
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=sys.argv[3], rank=rank, world_size=2)
encoder = load_sentence_encoder("embedded:all-MiniLM-L6-v2")
q = {
    str(n): encode_across_workers(encoder, texts[:n], "cpu", 32, rank, 2).contiguous()
    for n in (261, 100)  # uneven shares; a share with no text at all
}
if rank == 0:
    from safetensors.torch import save_file
    save_file(q, out)
dist.destroy_process_group()
"""


def test_encodings_shared_across_two_workers_equal_one_pass(aligner, tmp_path):
    """Two real processes (gloo): each encodes its run of whole batches, and the gathered q_i
    equal one process's single pass to the bit, with uneven shares and an empty one."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    texts = [f"Movie {i} ({1950 + i % 50}), " + "Drama " * (i % 9) for i in range(261)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    out = tmp_path / "q.safetensors"
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    args = [str(out), rendezvous, str(tmp_path / "texts.json")]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _ACROSS_WORKERS, str(rank), *args],
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    gathered = load_file(str(out))
    for n in (261, 100):
        expected = encode_texts(aligner.text_encoder, texts[:n], "cpu", max_tokens=32)
        assert torch.equal(gathered[str(n)], expected), n
