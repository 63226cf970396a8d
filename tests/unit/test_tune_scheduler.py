"""Tune's ASHA scheduler as allmrec runs it (no Ray started: a scheduler is plain Python fed
trials and results): what it decides is written down, and a search resumed after a crash
decides from the same rungs as the uninterrupted one."""

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from allmrec.distributed.tune_alpha_beta import RecordingASHA, read_rungs, read_stopped


def _scheduler(tune_dir) -> RecordingASHA:
    return RecordingASHA(
        tune_dir,
        time_attr="epoch",
        metric="valid_ndcg@10",
        mode="max",
        max_t=4,
        grace_period=1,
        reduction_factor=3,
    )


def _added(scheduler, names):
    trials = {name: SimpleNamespace(trial_id=name) for name in names}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    return trials


def _report(scheduler, trial, epoch: int, value: float) -> str:
    result = {"epoch": epoch, "valid_ndcg@10": value}
    return scheduler.on_trial_result(None, trial, result)


def test_a_resumed_search_keeps_the_rungs_and_the_cuts(tmp_path):
    names = ["t0", "t1", "t2", "t3"]
    before = _scheduler(tmp_path)
    trials = _added(before, names)
    assert _report(before, trials["t0"], 1, 0.53) == TrialScheduler.CONTINUE  # first at rung 1
    assert _report(before, trials["t1"], 1, 0.51) == TrialScheduler.STOP  # below t0: cut
    assert read_stopped(tmp_path) == {"t1": 1}
    assert read_rungs(tmp_path) == {"t0": {1: 0.53}, "t1": {1: 0.51}}

    # The driver dies; the resumed search's scheduler is a new object (Ray keeps no rungs).
    after = _scheduler(tmp_path)
    trials = _added(after, names)
    # t3 is the first result the new scheduler sees at rung 1; with empty rungs it would go
    # on. Against the rungs of before the crash it is below the cut-off: cut, as it would
    # have been without the crash.
    assert _report(after, trials["t3"], 1, 0.515) == TrialScheduler.STOP
    assert _report(after, trials["t2"], 1, 0.54) == TrialScheduler.CONTINUE
    # t1, cut before the crash and restored by Tune anyway, is cut again, once in the record
    assert _report(after, trials["t1"], 1, 0.51) == TrialScheduler.STOP
    # t0, recorded at rung 1 before the crash and restarted, is not compared there again
    assert _report(after, trials["t0"], 1, 0.50) == TrialScheduler.CONTINUE
    assert read_stopped(tmp_path) == {"t1": 1, "t3": 1}
    assert read_rungs(tmp_path) == {
        "t0": {1: 0.53},
        "t1": {1: 0.51},
        "t2": {1: 0.54},
        "t3": {1: 0.515},
    }


def test_a_fresh_scheduler_without_a_record_lets_the_first_arrival_go_on(tmp_path):
    """The failure the record prevents: the same t3 with no rungs goes on."""
    scheduler = _scheduler(tmp_path)
    trials = _added(scheduler, ["t3"])
    assert _report(scheduler, trials["t3"], 1, 0.515) == TrialScheduler.CONTINUE


def test_a_line_cut_short_by_a_crash_is_not_a_decision(tmp_path):
    (tmp_path / "stopped_by_asha.jsonl").write_text('{"trial_id": "t1", "at": 1}\n{"trial_')
    assert read_stopped(tmp_path) == {"t1": 1}


def test_a_trial_resumed_from_its_train_checkpoint_is_compared_at_its_epoch(tmp_path):
    """A restored trial's Train run resumes from its epoch-2 checkpoint: its first result is
    epoch 3, compared at rung 3 (Tune's report count would say 1, the rung it passed)."""
    before = _scheduler(tmp_path)
    trials = _added(before, ["t0", "t1"])
    for epoch, value in ((1, 0.53), (2, 0.53), (3, 0.54)):
        assert _report(before, trials["t0"], epoch, value) == TrialScheduler.CONTINUE
    assert _report(before, trials["t1"], 1, 0.531) == TrialScheduler.CONTINUE
    after = _scheduler(tmp_path)
    trials = _added(after, ["t0", "t1"])
    assert _report(after, trials["t1"], 3, 0.50) == TrialScheduler.STOP  # below t0 at rung 3
    assert read_stopped(tmp_path) == {"t1": 3}


def test_a_trial_cut_before_a_crash_is_cut_again_where_it_was_cut(tmp_path):
    before = _scheduler(tmp_path)
    trials = _added(before, ["t0", "t1"])
    for epoch, value in ((1, 0.53), (2, 0.53), (3, 0.54)):
        _report(before, trials["t0"], epoch, value)
    for epoch, value in ((1, 0.531), (2, 0.53)):
        _report(before, trials["t1"], epoch, value)
    assert _report(before, trials["t1"], 3, 0.50) == TrialScheduler.STOP
    # Tune restores t1 anyway (its state was saved before the cut), from scratch: it goes on
    # to the epoch where it was cut, and stops there
    after = _scheduler(tmp_path)
    trials = _added(after, ["t0", "t1"])
    assert _report(after, trials["t1"], 1, 0.531) == TrialScheduler.CONTINUE
    assert _report(after, trials["t1"], 2, 0.53) == TrialScheduler.CONTINUE
    assert _report(after, trials["t1"], 3, 0.50) == TrialScheduler.STOP
    assert read_stopped(tmp_path) == {"t1": 3}
