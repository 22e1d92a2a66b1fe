"""Whether the stage pools' minimum replicas can be placed on a cluster at all: Ray keeps an
actor that no node can hold pending without a word, so a job would wait forever."""

import pytest

from kinoray.models.cluster import local_cpus, needed_cpus, unplaceable
from kinoray.models.config import KinorayConfig


def config(**stages):
    return KinorayConfig.model_validate(stages)


def test_the_default_stages_fit_on_four_cpus_and_not_on_three():
    assert needed_cpus(config(), 1) == 4
    assert unplaceable(config(), [{"CPU": 4}], 1) is None
    assert unplaceable(config(), [{"CPU": 3}], 1) == (
        "the stage pools need 4 CPU (encoder.num_cpus 1, denoiser.num_cpus 1, decoder.num_cpus 1, "
        "readers and writers 1) and the cluster has 3"
    )


def test_minimum_replicas_count_and_zero_means_one():
    c = config(denoiser={"num_cpus": 2, "min_replicas": 3, "max_replicas": 4}, encoder={"min_replicas": 0})
    assert needed_cpus(c, 0.25) == 9  # 1 + 2 x 3 + 1 + 0.25, rounded up
    assert "denoiser.num_cpus 2 x denoiser.min_replicas 3 = 6" in unplaceable(c, [{"CPU": 8}], 0.25)
    assert local_cpus(c, 0.25) >= 9


def test_gpus_memory_and_custom_resources_are_checked_by_name():
    c = config(
        denoiser={"num_gpus": 1, "resources": {"h200": 1}},
        decoder={"memory_gb": 8},
    )
    nodes = [{"CPU": 8, "GPU": 1, "h200": 1, "memory": 16 * 2**30}]
    assert unplaceable(c, nodes, 1) is None
    assert unplaceable(c, [{**nodes[0], "GPU": 0}], 1) == (
        "the stage pools need 1 GPU (denoiser.num_gpus 1) and the cluster has 0"
    )
    assert unplaceable(c, [{**nodes[0], "memory": 16.28 * 2**30}], 1) is None
    assert unplaceable(c, [{**nodes[0], "memory": 4.2846 * 2**30}], 1) == (
        "the stage pools need 8 GiB of memory (decoder.memory_gb 8) and the cluster has 4.3"
    )
    assert "h200" in unplaceable(c, [{k: v for k, v in nodes[0].items() if k != "h200"}], 1)


def test_a_replica_must_fit_on_one_node():
    c = config(denoiser={"num_cpus": 1, "num_gpus": 2})
    split = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]  # 2 GPUs in all, never 2 on one node
    assert unplaceable(c, split, 1) == (
        "one denoiser replica needs denoiser.num_cpus 1, denoiser.num_gpus 2 on one node, "
        "and no node of the cluster has that much"
    )
    assert unplaceable(c, [{"CPU": 4, "GPU": 2}], 1) is None


def test_only_the_resources_asked_about_are_checked():
    c = config(denoiser={"num_gpus": 1})
    assert unplaceable(c, [{"CPU": 4}], 1, resources=("CPU",)) is None
    assert unplaceable(c, [{"CPU": 2}], 1, resources=("CPU",)).startswith("the stage pools need 4 CPU")


@pytest.mark.integration
def test_a_cluster_this_process_started_fails_and_another_one_is_waited_for(ray_session, capsys):
    from kinoray.models.cluster import check_placeable
    from kinoray.models.config import ConfigError

    c = config(denoiser={"num_gpus": 1000})
    check_placeable(c, 1, started=False)  # an autoscaler may add the nodes: a notice
    assert capsys.readouterr().err.startswith(
        "kinoray: waiting for the cluster: the stage pools need 1000 GPU (denoiser.num_gpus 1000)"
    )
    with pytest.raises(ConfigError, match=r"need 1000 GPU .*: lower the stage settings named"):
        check_placeable(c, 1, started=True)
    check_placeable(config(), 1, started=True)  # the defaults fit the session's 8 CPUs


def test_ray_s_own_resources_are_not_custom_ones():
    from pydantic import ValidationError

    for name, hint in (("CPU", "; use num_cpus"), ("GPU", "; use num_gpus"), ("memory", "; use memory_gb")):
        with pytest.raises(
            ValidationError, match=f"'{name}' is one of Ray's own resources, not a custom one{hint}"
        ):
            KinorayConfig.model_validate({"denoiser": {"resources": {name: 1}}})


def test_ray_data_s_warning_about_a_gpu_stage_s_cpu_share_is_dropped_unless_verbose(caplog):
    import logging

    from kinoray.models.cluster import CHOSEN, NOTICES, QUIET_LOGGERS, quiet

    names = [*QUIET_LOGGERS, *NOTICES, *CHOSEN]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    logger = logging.getLogger("ray.data._internal.execution.operators.map_operator")
    message = "Specifying both num_cpus and num_gpus for map tasks is experimental, and may result in ..."
    try:
        quiet(verbose=False)
        logger.warning(message)
        logger.warning("another warning")
        assert [r.getMessage() for r in caplog.records] == ["another warning"]
        quiet(verbose=True)
        logger.warning(message)
        assert caplog.records[-1].getMessage() == message
    finally:
        for name, (level, filters) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).filters[:] = filters
