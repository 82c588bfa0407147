"""Old path of the training pieces, kept importable: see runtime, batching, optim, step and evaluate."""
from lorakit.model.activation_checkpointing import enable_gradient_checkpointing  # noqa: F401
from lorakit.train.batching import (DataPosition, batch_order, batches_per_epoch, iterate_batches,  # noqa: F401
                                    total_steps)
from lorakit.train.evaluate import encode_prompt, evaluate_accuracy, evaluate_loss, greedy_generate  # noqa: F401
from lorakit.train.optim import build_optimizer, build_scheduler, is_lora_b, lr_factor, param_groups  # noqa: F401
from lorakit.train.runtime import (StopRequest, dist_env, is_main_process, model_device, resolve_device,  # noqa: F401
                                   rng_state, seed_everything, set_rng_state, to_device)
from lorakit.train.step import (CHUNKED_HEAD_MODEL_TYPES, HEAD_BLOCK_ELEMENTS, StepResult, TrainingDiverged,  # noqa: F401
                                chunked_head, first_nonfinite, loss_sum, train_step)
