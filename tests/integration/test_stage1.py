"""Stage 1: the loss terms by hand, DeepSpeed ZeRO-3 under Ray Train with 1 and 2 workers (a
fine-tuned encoder, a failed worker resumed), a resumed run against its uninterrupted twin,
the reconstruction ablation, and clear errors for missing inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from allmrec.config import load_config
from allmrec.manifest import ArtifactError
from allmrec.models.alignment import Autoencoder, stage1_losses


def _identity_autoencoder(dim: int) -> Autoencoder:
    """An autoencoder whose decoder undoes its encoder exactly (latent = input, no sigmoid)."""
    ae = Autoencoder(dim, dim)
    ae.encoder = torch.nn.Sequential(torch.nn.Identity())
    with torch.no_grad():
        ae.decoder.weight.copy_(torch.eye(dim))
        ae.decoder.bias.zero_()
    return ae


def test_loss_terms_on_hand_made_tensors():
    torch.manual_seed(0)
    e_pos, e_neg = torch.randn(4, 6), torch.randn(4, 6)
    x_u = torch.randn(4, 6)
    # Perfect reconstruction and text equal to items: match and both recon terms are zero.
    ae_i, ae_t = _identity_autoencoder(6), _identity_autoencoder(6)
    losses = stage1_losses(ae_i, ae_t, x_u, e_pos, e_neg, e_pos.clone(), e_neg.clone(), 0.5, 0.2)
    assert losses.match.item() == pytest.approx(0.0, abs=1e-7)
    assert losses.item_recon.item() == pytest.approx(0.0, abs=1e-7)
    assert losses.text_recon.item() == pytest.approx(0.0, abs=1e-7)
    # L_rec: BCE of mean(x_u * e_pos) vs 1 and mean(x_u * e_neg) vs 0, by hand.
    pos = (x_u * e_pos).mean(1)
    neg = (x_u * e_neg).mean(1)
    expected = (-torch.nn.functional.logsigmoid(pos)).mean() + (
        -torch.nn.functional.logsigmoid(-neg)
    ).mean()
    assert losses.rec.item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.total.item() == pytest.approx(expected.item(), rel=1e-5)

    # Different text: matching is positive; a non-identity decoder: reconstructions positive.
    q_pos = e_pos + 1.0
    losses = stage1_losses(ae_i, ae_t, x_u, e_pos, e_neg, q_pos, e_neg, 0.5, 0.2)
    assert losses.match.item() == pytest.approx(1.0, rel=1e-5)  # MSE of a shift by 1
    with torch.no_grad():
        ae_i.decoder.weight.mul_(2.0)
    losses = stage1_losses(ae_i, ae_t, x_u, e_pos, e_neg, q_pos, e_neg, 0.5, 0.2)
    assert losses.item_recon.item() > 0.1
    weighted = losses.match + 0.5 * losses.item_recon + 0.2 * losses.text_recon + losses.rec
    assert losses.total.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_text_recon_target_is_detached():
    ae_i, ae_t = Autoencoder(3, 4), Autoencoder(3, 4)
    q = torch.randn(2, 3, requires_grad=True)
    losses = stage1_losses(
        ae_i,
        ae_t,
        torch.randn(2, 3),
        torch.randn(2, 3),
        torch.randn(2, 3),
        q,
        q,
        alpha=0.0,
        beta=1.0,
    )
    losses.text_recon.backward()
    # The gradient reaches q only through the encoder path, not through the target.
    direct = torch.autograd.grad(torch.nn.functional.mse_loss(ae_t(q)[1], q.detach()) * 2, q)[0]
    assert torch.allclose(q.grad, direct, atol=1e-6)


@pytest.mark.slow
def test_zero3_one_and_two_workers_fine_tuned_encoder_resumed(stage1_run, other_stage1_run):
    """The session's one-worker Stage 1 (frozen text encoder) against its other one, same
    seed: two workers under ZeRO-3 that fine-tune the encoder's last layer and lose a worker
    at the start of epoch 2 (conftest `OTHER_STAGE1_SETTINGS`)."""
    one_dir, two_dir = stage1_run, other_stage1_run
    one = json.loads((one_dir / "stage1" / "manifest.json").read_text())
    two = json.loads((two_dir / "stage1" / "manifest.json").read_text())
    assert two["inputs"]["seed"] == one["inputs"]["seed"]  # the same initial autoencoders
    assert two["workers"] == 2 and one["workers"] == 1
    # ZeRO-3 partitions the trained module: each of 2 workers holds about half its elements.
    assert one["param_share_by_rank"] == pytest.approx([1.0])
    assert two["param_share_by_rank"] == pytest.approx([0.5, 0.5], abs=0.02)  # every rank's
    # The same first batch gives the same losses, partitioned or not, and whether q_i comes
    # from the frozen encoder's cache or from the trainable encoder's forward.
    for key, value in one["probe"].items():
        assert two["probe"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # A worker failed at the start of epoch 2; Ray Train restarted both, and they resumed from
    # the epoch-1 checkpoint (every rank its shard) instead of starting over.
    assert two["resumed_from_epochs"] == [1]
    assert two["epochs_run"] == 2
    # The same artifact format.
    files = sorted(p.name for p in (one_dir / "stage1").iterdir())
    assert files == sorted(p.name for p in (two_dir / "stage1").iterdir())
    assert {
        "item_autoencoder.safetensors",
        "text_autoencoder.safetensors",
        "text_encoder",
        "joint_item_emb.parquet",
        "manifest.json",
        "curves.png",
    } <= set(files)
    joint = pq.read_table(one_dir / "stage1" / "joint_item_emb.parquet")
    assert joint.num_rows == 1349 and joint.schema.field("z").type.list_size == 128
    assert set(joint.column("source").to_pylist()) <= {"item", "text"}
    z = np.stack(joint.column("z").to_numpy(zero_copy_only=False))
    assert ((z > 0) & (z < 1)).all()  # sigmoid outputs
    # beside z_i: every item's enc_T(q_i) (the SBERT row) and q_i (the text-aware readout)
    z_text = np.stack(joint.column("z_text").to_numpy(zero_copy_only=False))
    q = np.stack(joint.column("q").to_numpy(zero_copy_only=False))
    assert z_text.shape == (1349, 128) and ((z_text > 0) & (z_text < 1)).all()
    assert q.shape == (1349, 384) and not np.allclose(z_text[:, :1], z[:, :1])
    # The fine-tuned encoder's last layer was trained (and gathered from its shards).
    from sentence_transformers import SentenceTransformer

    from allmrec.text_encoder import load_sentence_encoder

    tuned = SentenceTransformer(str(two_dir / "stage1" / "text_encoder"), device="cpu")
    original = load_sentence_encoder("embedded:all-MiniLM-L6-v2")
    a = tuned.encode(["Toy Story (1995), Animation"], convert_to_tensor=True)
    b = original.encode(["Toy Story (1995), Animation"], convert_to_tensor=True)
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_a_resumed_run_equals_the_uninterrupted_one(cf_run, stage1_run, stage1_settings, tmp_path):
    """The session's Stage 1 (4 epochs, a checkpoint every 2) again, with a worker failing at
    the start of epoch 3: it resumes from epoch 2, and its outputs equal the uninterrupted
    run's, bit for bit."""
    from safetensors.torch import load_file

    from allmrec.config import load_config
    from allmrec.distributed.train_stage1 import train_stage1

    run_dir = tmp_path / "resumed"
    shutil.copytree(cf_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "stage1"))
    config = load_config(["configs/ml-100k-cpu.yaml"], [*stage1_settings, "stage1.fail_at_epoch=3"])
    resumed = train_stage1(config, run_dir)
    twin = json.loads((stage1_run / "stage1" / "manifest.json").read_text())
    assert resumed["resumed_from_epochs"] == [2] and twin["resumed_from_epochs"] == []
    assert resumed["epochs_run"] == twin["epochs_run"] == 4
    assert resumed["metrics"] == twin["metrics"]
    ours, theirs = run_dir / "stage1", stage1_run / "stage1"
    joint = "joint_item_emb.parquet"
    assert pq.read_table(ours / joint).equals(pq.read_table(theirs / joint))
    for name in ("item_autoencoder.safetensors", "text_autoencoder.safetensors"):
        mine, other = load_file(str(ours / name)), load_file(str(theirs / name))
        assert mine.keys() == other.keys()
        assert all(torch.equal(mine[k], other[k]) for k in other), name


@pytest.mark.slow
def test_reconstruction_ablation(cf_run):
    """The paper's ablation, in process with the library's pieces and a frozen text encoder:
    without the reconstruction losses the item path no longer preserves the CF embeddings,
    and ranking through it gets worse."""
    from allmrec.data.prepared import load_prepared
    from allmrec.models.alignment import CollabTextAligner
    from allmrec.storage import cache_dir
    from allmrec.text_encoder import load_sentence_encoder
    from allmrec.training.cf import load_cf_model
    from allmrec.training.stage1 import (
        frozen_cf_inputs,
        frozen_text_encodings,
        item_texts,
        stage1_batch,
        stage1_quality,
    )

    torch.set_num_threads(2)
    data = load_prepared(cf_run)
    cf_model, _ = load_cf_model(cf_run, data)
    frozen = frozen_cf_inputs(cf_model, data, 50)
    texts, _, cold = item_texts(data)
    encoder = load_sentence_encoder("embedded:all-MiniLM-L6-v2")
    # the frozen encoder's q_i, kept by the session's Stage 1 artifact writer (2 threads)
    q = frozen_text_encodings(encoder, texts, "cpu", 128, cache_dir() / "text-encodings")
    results = {}
    for alpha, beta in ((0.5, 0.2), (0.0, 0.0)):
        torch.manual_seed(0)
        aligner = CollabTextAligner(encoder, 50, 384)
        params = [*aligner.item_ae.parameters(), *aligner.text_ae.parameters()]
        optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.98))
        users = data.training_users()
        for epoch in range(30):
            rng = np.random.default_rng(epoch)
            order = rng.permutation(users)
            for start in range(0, len(order), 32):
                batch = stage1_batch(order[start : start + 32], data, frozen, texts, rng)
                losses = aligner.losses(
                    batch["x_u"],
                    batch["e_pos"],
                    batch["e_neg"],
                    q[batch["pos"]],
                    q[batch["neg"]],
                    alpha,
                    beta,
                )
                optimizer.zero_grad()
                losses.total.backward()
                optimizer.step()
        with torch.no_grad():
            e = frozen.item_table[1:]
            recon = torch.nn.functional.mse_loss(aligner.item_ae(e)[1], e).item()
        results[alpha] = (recon, stage1_quality(aligner, frozen, q, data, cold, 42))
    (recon_with, quality_with), (recon_without, quality_without) = results[0.5], results[0.0]
    # Measured on MovieLens-100K: 0.10 with alpha = 0.5, 18.7 without.
    assert recon_without > 20 * recon_with
    assert quality_without["valid_hit@1"] < quality_with["valid_hit@1"]


def test_missing_cf_artifact_is_a_clear_error(ml100k_prepared, tmp_path):
    from allmrec.distributed.train_stage1 import train_stage1

    source, _ = ml100k_prepared
    shutil.copytree(source / "data", tmp_path / "data")
    with pytest.raises(ArtifactError, match=r"cf/manifest.json: missing.*allmrec train cf"):
        train_stage1(load_config(["configs/ml-100k-cpu.yaml"]), tmp_path)
    (tmp_path / "cf").mkdir()
    (tmp_path / "cf" / "manifest.json").write_text(json.dumps({"stage": "cf"}))
    with pytest.raises(ArtifactError, match="format_version"):
        train_stage1(load_config(["configs/ml-100k-cpu.yaml"]), tmp_path)
