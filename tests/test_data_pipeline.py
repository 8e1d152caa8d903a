"""The data layer: task identity through mixing and packing, rates, resume, sharding."""

import numpy as np
import pytest
import seqio
from tsv_tasks import VOCAB
from tsv_tasks import register_mixture as _register_mixture
from tsv_tasks import register_tsv as _register_tsv

from mtx.data import materialize, mixing, pipeline, registry
from mtx.errors import UserError


def _load(name, batch_size, units, lengths=(8, 8), **kw):
  layout = pipeline.Layout(batch_size, units, *lengths)
  return pipeline.load(name, {"inputs": lengths[0], "targets": lengths[1]}, layout, **kw)


@pytest.fixture
def two_tsv_tasks(tmp_path):
  # One example each, so the hand-computed order below is the whole story.
  _register_tsv("t_a", tmp_path / "a.tsv", [("ab", "xy")])
  _register_tsv("t_b", tmp_path / "b.tsv", [("c", "z")])
  _register_mixture("t_ab", [("t_b", 1.0), ("t_a", 1.0)])
  return "t_ab"


def test_ids_are_sorted_names(two_tsv_tasks):
  spec = registry.resolve(two_tsv_tasks)
  assert spec.task_names == ("t_a", "t_b")
  assert spec.group_of_task == (0, 1)


def test_task_ids_survive_mixing_and_packing(two_tsv_tasks):
  # Equal rates; ties go to the lower id: a, b, a, then b no longer fits the row.
  # a = "xy"+EOS (3 tokens), b = "z"+EOS (2 tokens): 3 + 2 + 3 = 8 target tokens.
  p = _load(two_tsv_tasks, batch_size=1, units=0)
  batch = p.next_batch()
  x, y, z = (VOCAB.encode(c)[0] for c in "xyz")
  eos = 1
  np.testing.assert_array_equal(
    batch["decoder_target_tokens"][0], [x, y, eos, z, eos, x, y, eos]
  )
  np.testing.assert_array_equal(batch["decoder_task_ids"][0], [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["decoder_segment_ids"][0], [1, 1, 1, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(
    batch["decoder_input_tokens"][0], [0, x, y, 0, z, 0, x, y]
  )
  np.testing.assert_array_equal(batch["encoder_segment_ids"][0], [1, 1, 1, 2, 2, 3, 3, 3])
  assert p.get_state()["cursors"] == {"t_a": 2, "t_b": 1}


def test_task_major_units_hold_one_task(two_tsv_tasks):
  p = _load(two_tsv_tasks, batch_size=4, units=2)
  batch = p.next_batch()
  assert batch["decoder_task_ids"].shape == (2, 2, 8)
  for u in range(2):
    ids = batch["decoder_task_ids"][u]
    assert set(np.unique(ids[ids >= 0])) == {batch["unit_task"][u]}
  assert sorted(batch["unit_task"].tolist()) == [0, 1]


@pytest.fixture
def three_tasks(tmp_path):
  rng = np.random.default_rng(0)

  def rows(n, max_len):
    return [
      (
        "".join(rng.choice(list("abcdef"), rng.integers(1, max_len))),
        "".join(rng.choice(list("ghij"), rng.integers(1, max_len))),
      )
      for _ in range(n)
    ]

  _register_tsv("r_long", tmp_path / "l.tsv", rows(40, 14))
  _register_tsv("r_mid", tmp_path / "m.tsv", rows(25, 8))
  _register_tsv("r_short", tmp_path / "s.tsv", rows(7, 3))
  _register_mixture("r_mix", [("r_long", 5.0), ("r_mid", 3.0), ("r_short", 2.0)])
  return "r_mix"


def _examples_per_task(batch, k):
  seg, ids = batch["decoder_segment_ids"], batch["decoder_task_ids"]
  seg = seg.reshape(-1, seg.shape[-1])
  ids = ids.reshape(-1, ids.shape[-1])
  starts = (seg > 0) & np.concatenate(
    [np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1
  )
  return np.bincount(ids[starts], minlength=k)


@pytest.mark.parametrize("units", [0, 4])
def test_realised_rates_match(three_tasks, units):
  p = _load(three_tasks, batch_size=8, units=units, lengths=(16, 16))
  counts = sum(_examples_per_task(p.next_batch(), 3) for _ in range(200))
  shares = counts / counts.sum()
  np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.02 * 0.2, rtol=0.02)
  # Tasks repeat rather than stop the mixture: the small task went round many times.
  assert p.epochs()["r_short"] > 10


def test_unit_assignment_varies_and_is_exact_for_groups(three_tasks):
  p = _load(
    three_tasks,
    batch_size=8,
    units=4,
    lengths=(16, 16),
    task_groups={"r_long": "g1", "r_mid": "g1"},
  )
  assert p.spec.group_names == ("g1", "r_short")
  seen = set()
  counts = np.zeros(3)
  for _ in range(200):
    b = p.next_batch()
    seen.add(tuple(b["unit_task"]))
    counts += _examples_per_task(b, 3)
    for u in range(4):  # a unit of group g1 holds only g1's tasks
      ids = b["decoder_task_ids"][u]
      ids = set(np.unique(ids[ids >= 0]).tolist())
      assert ids <= ({0, 1} if b["unit_task"][u] == 0 else {2})
  assert len(seen) > 1
  np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], rtol=0.02)


@pytest.mark.parametrize("units", [0, 4])
def test_restart_at_step_s_gives_the_same_batches(three_tasks, units):
  straight = _load(three_tasks, batch_size=8, units=units, seed=3)
  expected = [straight.next_batch() for _ in range(12)]
  first = _load(three_tasks, batch_size=8, units=units, seed=3)
  for _ in range(5):
    first.next_batch()
  state = first.get_state()
  resumed = _load(three_tasks, batch_size=8, units=units, seed=3)
  resumed.set_state(state)
  for want in expected[5:]:
    got = resumed.next_batch()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_seed_changes_order(three_tasks):
  a = _load(three_tasks, batch_size=8, units=0, seed=1).next_batch()
  b = _load(three_tasks, batch_size=8, units=0, seed=2).next_batch()
  assert not np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])


def test_two_process_shards_cover_every_example_once(three_tasks):
  task = seqio.get_mixture_or_task("r_long")
  lengths = {"inputs": 16, "targets": 16}
  whole = materialize.read_task(task, "train", lengths)
  parts = [materialize.read_task(task, "train", lengths, i, 2) for i in range(2)]
  as_set = lambda ex: [
    tuple(ex.inputs.get(i)) + (-1,) + tuple(ex.targets.get(i)) for i in range(len(ex))
  ]
  combined = as_set(parts[0]) + as_set(parts[1])
  assert sorted(combined) == sorted(as_set(whole))
  assert len(parts[0]) + len(parts[1]) == len(whole) and min(map(len, parts)) > 0


def test_over_long_examples_are_truncated_and_counted(tmp_path):
  _register_tsv("t_long", tmp_path / "x.tsv", [("abcdefghij", "klmnopqrst"), ("a", "b")])
  ex = materialize.read_task(
    seqio.get_mixture_or_task("t_long"), "train", {"inputs": 4, "targets": 5}
  )
  assert ex.num_truncated == 1
  assert ex.targets.get(0).tolist()[-1] == 1 and len(ex.targets.get(0)) == 5
  assert len(ex.inputs.get(0)) == 4


def test_rate_functions():
  r = mixing.compute_rates(
    "examples_proportional", [1, 1, 1], [100, 10, 1000], maximum=500
  )
  np.testing.assert_allclose(r, np.array([100, 10, 500]) / 610)
  r = mixing.compute_rates("temperature", [1, 1], [100, 400], temperature=2.0)
  np.testing.assert_allclose(r, [10 / 30, 20 / 30])
  np.testing.assert_allclose(mixing.compute_rates("equal", [5, 1], [1, 2]), [0.5, 0.5])
  np.testing.assert_allclose(
    mixing.compute_rates("mixture", [3, 1], [1, 2]), [0.75, 0.25]
  )


# ---- bad input: one sentence naming the culprit and the fix ---------------------------
def test_unknown_name_suggests_close_names(two_tsv_tasks):
  with pytest.raises(UserError, match=r"'t_abx'.*did you mean: t_ab"):
    registry.resolve("t_abx")


def test_different_vocabularies_rejected(tmp_path):
  _register_tsv("v_1", tmp_path / "1.tsv", [("a", "b")])
  other = {
    k: seqio.Feature(seqio.PassThroughVocabulary(300), add_eos=True)
    for k in ("inputs", "targets")
  }
  seqio.TaskRegistry.remove("v_2")
  seqio.TaskRegistry.add(
    "v_2",
    source=seqio.TextLineDataSource({"train": str(tmp_path / "1.tsv")}),
    preprocessors=[],
    output_features=other,
  )
  _register_mixture("v_mix", [("v_1", 1), ("v_2", 1)])
  with pytest.raises(UserError, match="different vocabularies"):
    registry.resolve("v_mix")


def test_empty_task_rejected(tmp_path):
  _register_tsv("t_empty", tmp_path / "e.tsv", [])
  with pytest.raises(UserError, match="no examples"):
    _load("t_empty", 2, 0)


@pytest.mark.parametrize(
  "lengths",
  [{"inputs": 0, "targets": 8}, {"inputs": 8}, {"inputs": 8, "targets": -1}, [8, 8]],
)
def test_bad_feature_lengths(lengths):
  with pytest.raises(UserError, match="TASK_FEATURE_LENGTHS"):
    pipeline.check_feature_lengths(lengths)


def test_bad_layout():
  with pytest.raises(UserError, match="not divisible by UNITS"):
    pipeline.check_layout(pipeline.Layout(10, 4, 8, 8), 1)
  with pytest.raises(UserError, match="processes"):
    pipeline.check_layout(pipeline.Layout(6, 0, 8, 8), 4)


def test_zero_rate_cap_is_an_error_not_no_cap():
  with pytest.raises(UserError, match="rate_maximum must be positive"):
    mixing.compute_rates("examples_proportional", [1, 1], [10, 20], maximum=0)
