"""The pieces of train_impl dpo / kto / rm that the TRL comparison (tests/distributed/test_preference.py) does not
reach: the reward model's Hugging Face export and import, the config rules, the loss variants (dpo_reference_free,
dpo_fp32 false, KTO weights), KTO's mismatched KL rows, the frozen reference and the errors on bad batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neox.checkpoint import save_consolidated
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_reward import from_hf_reward_state_dict
from neox.config import ConfigError
from neox.data.errors import DataError
from neox.data.formats import open_indexed
from neox.data.indexed import IndexedDatasetWriter
from neox.data.loader import collate_samples
from neox.data.pairwise_dataset import PairwiseDataset
from neox.model import GPTNeoX
from neox.parallel.global_batch import loss_context
from neox.train.objectives import build_objective
from neox.train.objectives.dpo import REF_LOGPS, DPOObjective
from neox.train.objectives.kto import DESIRABILITY, KL_REFERENCE_POINT, KTOObjective, mismatched_pairs
from neox.train.objectives.reference import FrozenReference
from neox.train.objectives.rm import RewardModelObjective
from tests.distributed import preference_checks as checks

CTX = loss_context(None, checks.VOCAB)


def _log_probs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    token = torch.log_softmax(logits.double(), -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
    return (token * batch["loss_mask"]).sum(-1)


@pytest.fixture(scope="module")
def step_batch() -> dict:
    return checks.global_batches("dpo")[0][0]  # 2 pairs: chosen rows 0-1, rejected rows 2-3


def test_objectives_are_built_from_train_impl_with_gpt_neox_keys():
    dpo = build_objective(checks.config("dpo", {"dpo_beta": 0.3, "dpo_reference_free": True, "dpo_fp32": False}))
    assert isinstance(dpo, DPOObjective) and (dpo.beta, dpo.reference_free, dpo.fp32) == (0.3, True, False)
    kto = build_objective(checks.config("kto", {"kto_beta": 0.2, "kto_desirable_weight": 1.5,
                                                "kto_undesirable_weight": 0.5, "kto_fp32": False}))
    assert isinstance(kto, KTOObjective)
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight, kto.fp32) == (0.2, 1.5, 0.5, False)
    rm = build_objective(checks.config("rm", {"z_loss": 0.01}))
    assert isinstance(rm, RewardModelObjective) and rm.z_loss == 0.01


@pytest.mark.parametrize("objective, extra, message", [
    ("dpo", {"dpo_beta": 0.0}, "'dpo_beta' must be positive"),
    ("kto", {"kto_undesirable_weight": -1.0}, "'kto_undesirable_weight' must be >= 0"),
    ("kto", {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4}, "train_micro_batch_size_per_gpu"),
    ("rm", {"use_mup": True, "base_shapes_file": "base.shapes"}, "without use_mup"),
    ("kto", {"precompute_model_name": "ref"}, "mismatched prompt/completion pairs"),
    ("rm", {"precompute_model_name": "ref"}, "reference log-probs of a dpo run"),
    ("dpo", {"precompute_model_name": "ref", "dpo_reference_free": True}, "choose one"),
    ("dpo", {"precompute_model_name": "../ref"}, "'precompute_model_name'"),
    ("dpo", {"text_gen_type": "precompute"}, "set 'precompute_model_name'"),
])
def test_bad_preference_configs_name_the_key(objective, extra, message):
    with pytest.raises(ConfigError, match=message):
        checks.config(objective, extra)


@pytest.mark.parametrize("objective, extra", [("dpo", {}), ("dpo", {"dpo_reference_free": True}), ("kto", {}),
                                              ("rm", {})])
def test_zero3_is_accepted_with_or_without_a_live_reference(objective, extra):
    assert checks.config(objective, {"zero_optimization": {"stage": 3}, **extra}).optim.zero_stage == 3


def test_reference_free_dpo_and_dpo_fp32_false(step_batch):
    torch.manual_seed(1)
    logits = torch.randn(4, checks.SEQ, checks.VOCAB)
    logps = _log_probs(logits, step_batch)
    free = DPOObjective(0.5, reference_free=True)
    batch = free.prepare([step_batch], engine=None)[0]  # no reference forward at all
    out = free.loss(logits, free.targets(batch), CTX)
    expected = -F.logsigmoid(0.5 * (logps[:2] - logps[2:])).sum()  # reference log-probs taken as 0
    assert abs(float(out.loss) - float(expected)) < 1e-5
    assert abs(float(out.metrics["logps_chosen"][0]) - float(logps[:2].sum())) < 1e-4
    # With a reference: the rewards are beta x (policy - reference); in bf16 logits (dpo_fp32 false) they are close.
    ref = logps.float() - torch.tensor([0.1, 0.2, -0.3, 0.4])
    with_ref = DPOObjective(0.5)
    out = with_ref.loss(logits, with_ref.targets({**step_batch, REF_LOGPS: ref}), CTX)
    assert abs(float(out.metrics["rewards_chosen"][0]) - 0.5 * 0.3) < 1e-5
    half = DPOObjective(0.5, fp32=False).loss(logits.bfloat16(), with_ref.targets({**step_batch, REF_LOGPS: ref}), CTX)
    assert 0 < abs(float(half.loss) - float(out.loss)) < 0.05


def test_kto_weights_and_mismatched_kl_rows():
    batch = checks.global_batches("kto")[0][0]  # row 0 desirable, row 1 undesirable
    kl = mismatched_pairs(batch)
    for i in range(2):  # row i: its own prompt, then row i-1's completion, trained on that completion only
        j = (i - 1) % 2
        prompt = batch["tokens"][i][:int(batch["loss_mask"][i].nonzero()[0]) + 1]  # up to the first trained input
        completion = batch["labels"][j][batch["loss_mask"][j] > 0]
        assert torch.equal(kl["tokens"][i][:len(prompt)], prompt)
        assert torch.equal(kl["labels"][i][kl["loss_mask"][i] > 0], completion)
    torch.manual_seed(2)
    logits = torch.randn(2, checks.SEQ, checks.VOCAB)
    ratio = torch.tensor([0.7, -0.4])
    ref = _log_probs(logits, batch).float() - ratio
    prepared = {**batch, REF_LOGPS: ref, KL_REFERENCE_POINT: torch.full((2,), 0.2),
                DESIRABILITY: torch.tensor([1.0, -1.0])}
    kto = KTOObjective(0.1, desirable_weight=2.0, undesirable_weight=0.5)
    out = kto.loss(logits, kto.targets(prepared), CTX)
    expected = 2.0 * (1 - torch.sigmoid(0.1 * (ratio[0] - 0.2))) + 0.5 * (1 - torch.sigmoid(0.1 * (0.2 - ratio[1])))
    assert abs(float(out.loss) - float(expected)) < 1e-5
    assert float(out.metrics["rewards_accuracy"][0]) == 2.0  # both rewards have their label's sign
    with pytest.raises(DataError, match="train_reward_data_paths"):
        KTOObjective(0.1).prepare([{k: v for k, v in batch.items() if k != "reward"}], engine=None)


def test_reward_model_scores_the_last_trained_position_and_refuses_rows_without_one():
    scores = torch.arange(2 * checks.SEQ, dtype=torch.float32).view(2, checks.SEQ)
    mask = torch.zeros(2, checks.SEQ)
    mask[0, [2, 5]], mask[1, [1, 3]] = 1, 1  # scored at 5 and 3: scores 5 and SEQ + 3
    out = RewardModelObjective(z_loss=0.1).loss(scores, (mask,), CTX)
    chosen, rejected = scores[0, 5], scores[1, 3]
    expected = -F.logsigmoid(chosen - rejected) + 0.1 * (chosen ** 2 + rejected ** 2)
    assert abs(float(out.loss) - float(expected)) < 1e-3
    assert float(out.metrics["rewards_margin"][0]) == 5 - (checks.SEQ + 3)
    mask[1] = 0
    with pytest.raises(DataError, match="no trained position"):
        RewardModelObjective().loss(scores, (mask,), CTX)


def test_frozen_reference_swaps_the_starting_weights_in_and_back():
    torch.manual_seed(0)
    model = GPTNeoX(checks.config("dpo").model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = FrozenReference(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with reference.swapped_in():
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, start[k] + 1.0) for k, v in model.state_dict().items())


def test_reward_model_exports_as_sequence_classification_and_imports_back(tmp_path, step_batch):
    from transformers import AutoModelForSequenceClassification

    cfg = checks.config("rm")
    torch.manual_seed(4)
    model = GPTNeoX(cfg.model, value_head=True).eval()
    save_consolidated(tmp_path / "rm", cfg, model.state_dict(), [], iteration=5)
    out = export_to_hf(tmp_path / "rm", tmp_path / "hf", keep_padded_vocab=True, progress=False)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "GPTNeoXForSequenceClassification" and hf.config.num_labels == 1
    tokens = step_batch["tokens"]
    last = (step_batch["loss_mask"] > 0).int().cumsum(-1).argmax(-1)  # the last trained position of each row
    with torch.no_grad():
        ours = model(tokens, position_ids=step_batch["position_ids"])
        for row in range(tokens.shape[0]):  # HF scores the last token of an unpadded sequence
            theirs = hf(tokens[row:row + 1, :int(last[row]) + 1]).logits
            assert theirs.shape == (1, 1) and abs(float(theirs) - float(ours[row, last[row]])) < 1e-5
    # Back (tools/convert_hf_to_neox.py's mapping; the char-level tokenizer has no HF import): the very tensors.
    back_cfg, weights = from_hf_reward_state_dict(hf.config, hf.state_dict(), checks.VOCAB)
    assert back_cfg.hidden_size == cfg.model.hidden_size and weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def _shard(path, documents, dtype):
    with IndexedDatasetWriter(path, dtype, values=dtype == np.float32) as writer:
        for doc in documents:
            writer.add_document(doc)
    return open_indexed(path)


def test_pairwise_data_reads_gpt_neox_precomputed_files_and_dpo_sums_them(tmp_path):
    """gpt-neox's layout: seq_length values per document, then padding documents; value t is the log-prob of the
    label at t. DPO's reference is their sum over the trained labels."""
    seq = 6
    docs = {"pos": [[5, 6, 7, 1], [8, 9, 1]], "neg": [[5, 6, 1], [8, 9, 10, 11, 12, 13, 14, 15, 1]]}  # one chopped
    labels = {side: [[-100] + d[1:] for d in ds] for side, ds in docs.items()}
    refs = {side: [np.arange(seq, dtype=np.float32) * -(k + 1) - (side == "neg") for k in range(len(ds))]
            + [np.zeros(seq, np.float32)] * 2 for side, ds in docs.items()}
    src = {}
    for side in ("pos", "neg"):
        src[side] = _shard(tmp_path / side, docs[side], np.int32)
        src[f"{side}_label"] = _shard(tmp_path / f"{side}_label", labels[side], np.int32)
        src[f"{side}_ref"] = _shard(tmp_path / f"{side}_ref", refs[side], np.float32)
    data = PairwiseDataset("t", num_samples=2, seq_length=seq, seed=1, cache_dir=tmp_path / "cache", **src)
    order = [int(data.order[i]) for i in range(2)]
    batch = collate_samples([data[i] for i in range(2)], eod_token=1, eod_mask_loss=False)
    expected = torch.tensor(np.stack([refs[side][k] for side in ("pos", "neg") for k in order]))
    assert torch.equal(batch["ref_token_logps"], expected)
    out = DPOObjective(0.1, precomputed=True).prepare([batch], engine=None)[0]
    assert torch.allclose(out[REF_LOGPS], (expected * batch["loss_mask"]).sum(-1))

    short = {**src, "neg_ref": _shard(tmp_path / "short", [r[:2] for r in refs["neg"]], np.float32)}
    with pytest.raises(DataError, match="neg_ref.*every label position"):
        PairwiseDataset("u", num_samples=2, seq_length=seq, seed=1, cache_dir=tmp_path / "cache", **short)
