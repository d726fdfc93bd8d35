"""One optimiser step under Accelerate, shared by the pretraining and fine-tuning loops."""

from __future__ import annotations

import torch


def backward_and_step(accelerator, model: torch.nn.Module, optimizer, scheduler, loss: torch.Tensor,
                      clip_grad: float | None, step: int) -> None:
    """Backward ``loss`` and step (call inside ``accelerator.accumulate(model)``).

    A non-finite loss stops the run with the step number. Gradients are clipped to ``clip_grad`` here
    only without DeepSpeed, whose config clips them itself.
    """
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
    accelerator.backward(loss)
    if accelerator.sync_gradients and clip_grad and accelerator.state.deepspeed_plugin is None:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
