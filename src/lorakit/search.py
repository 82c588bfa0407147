"""Old path of lorakit.train.search, kept importable."""
from lorakit.train.search import *  # noqa: F401,F403
from lorakit.train.search import (DEFAULT_TARGET_SETS, METRICS, PruningHook, Report, SearchSpace,  # noqa: F401
                                  TrialContext, best_options, build_context, finished, measure, open_study,
                                  overrides_for, parse_target_sets, results_table, retry_interrupted, run_search,
                                  save_plots, train_trial, trial_base_dict, trial_rows, write_best_yaml,
                                  write_outputs)
