"""ONE training loop for pretraining and every fine-tuning mode.

The contract of `train()` (fine-tuning builds on exactly this; nothing else changes between modes):

    result = train(
        model,                      # nn.Module (a GPT, or a GPT with another head / LoRA adapters)
        batches,                    # BatchSource: next_batch() -> batch; state_dict(); load_state_dict()
        config=TrainConfig(...),    # optimisation, schedule, eval/log/checkpoint cadence, hardware
        loss_fn=lm_loss,            # loss_fn(model, batch) -> scalar Tensor (mean over the batch)
        params=None,                # trainable parameters (default: all with requires_grad)
        evals={"val": fn},          # name -> fn(model) -> {"loss": float, ...any other metrics}
        sample_fn=None,             # fn(model) -> str, printed on rank 0 every sample_interval steps
        tokenizer=tok,              # saved into every checkpoint, so the run directory is self-contained
        run_config=run.to_dict(),   # the resolved config, stored in config.json under "run"
        export_fn=None,             # fn(model, directory) writing a loadable model (default: save_model)
    )

- A *batch* is whatever `next_batch()` returns: a Tensor, a tuple/list of Tensors or a dict of them. The
  loop moves it to the device (recursively) and hands it to `loss_fn` unchanged. Tokens per batch (for
  tok/s and MFU) are the element count of its first tensor (`x` for LM batches).
- `loss_fn(model, batch)` receives the *wrapped* model (DDP/FSDP/compiled), so call it (`model(...)`)
  rather than reaching into attributes; use `checkpoint.unwrap(model)` for attributes. It returns the
  mean loss of that micro-batch; the loop divides by `grad_accum_steps` itself.
- `params`: only these are optimised (AdamW; weight decay on tensors with >= 2 dims). Frozen parameters
  should also have requires_grad=False so no gradients are computed for them.
- `evals[name](model)` runs every `eval_interval` steps and at the end, in eval mode under no_grad, on
  every rank (shard the work and all-reduce, see `evaluate_lm`). Keys become log.csv columns
  `<name>_<key>`; `evals["val"]["loss"]` (else the first eval's "loss") picks the best checkpoint.
- The batch source's `state_dict()` must be JSON-able and identical on every rank (rank-aware
  sources derive their shard from the rank themselves), so that resuming continues at exactly the
  same batch. Both samplers in `scratchgpt.data` do this.
- Checkpoints: `out_dir/ckpt-<step>/` (full training state), a `latest` pointer, and the model alone
  exported to `out_dir/` (latest) and `out_dir/best/` (best by validation loss): `load_model(out_dir)`
  and `load_any(out_dir)` work on both.

`pretrain(run_config)` is the glue for language-model pretraining: prepared token files, a GPT from
scratch (or from a checkpoint), LM evaluation of train and val splits, and periodic samples.
"""
