"""Which DeepSpeed checkpoint files a relaunch needs (checkpoint.missing_rank), per ZeRO stage, from
the file names DeepSpeed 0.19 writes: ZeRO off keeps everything in rank 0's model states."""

from workflows.recalibrate.checkpoint import missing_rank

ZERO_OFF = ["mp_rank_00_model_states.pt"]
ZERO_2 = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_zero_off_needs_rank_0s_model_states_only():
    assert missing_rank(ZERO_OFF, world=2, zero_stage=0) is None
    assert "mp_rank_00_model_states.pt (rank 0's module weights and optimizer state) is missing" in \
        missing_rank([], world=2, zero_stage=0)


def test_a_checkpoint_of_another_stage_is_refused_both_ways():
    assert "per-rank optimizer shards" in missing_rank(ZERO_2, world=2, zero_stage=0)
    assert "optim_states shard of rank 0 is missing" in missing_rank(ZERO_OFF, world=2, zero_stage=2)
    assert missing_rank(ZERO_2, world=2, zero_stage=2) is None
    assert "rank 1" in missing_rank(ZERO_2[:2], world=2, zero_stage=1)
