"""The search driver's choices that need Ray but no sweep. The README's main job end to end: test_quickstart.py;
faults and retries: test_recovery.py; interrupts and resume: test_interrupts.py and test_s3_storage.py; Optuna:
test_artifacts.py."""


def test_gpu_share_is_a_whole_gpu_when_trial_memory_cannot_be_measured(capsys):
    """The probe runs as a Ray task on a GPU; where it fails (here: a logical GPU, no CUDA) trials get a whole GPU."""
    import ray

    from tune_lfm.config import TrialConfig
    from tune_lfm.runner import measured_gpus_per_trial

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        share = measured_gpus_per_trial(TrialConfig(model="tiny-lfm2", max_steps=2), cap=4)
    finally:
        ray.shutdown()
    assert share == 1.0
    err = capsys.readouterr().err
    assert "could not measure trial memory" in err and "needs a CUDA GPU" in err and "one trial per GPU" in err


def test_the_callback_usage_tag_the_driver_skips_is_still_the_one_tune_calls():
    """`runner._skip_callback_usage_tag` replaces Ray's `usage.tag_callbacks`, which `tune.run` looks up by that name
    at every run; were Ray to move it, each driver would import mlflow again (a CPU-second) and this fails."""
    import inspect

    from ray.air._internal import usage
    from ray.tune import tune as tune_module

    from tune_lfm.runner import _skip_callback_usage_tag

    assert tune_module.air_usage is usage and "air_usage.tag_callbacks(" in inspect.getsource(tune_module.run)
    original = usage.tag_callbacks
    try:
        _skip_callback_usage_tag()
        assert usage.tag_callbacks([object()]) is False and usage.tag_callbacks is not original
    finally:
        usage.tag_callbacks = original
