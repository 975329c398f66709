"""Aten-level passes that run inside Inductor, on the post-grad graph (after AOT autograd and the
partitioner), chained into ``torch._inductor.config.post_grad_custom_post_pass`` by the backend.

The torch-level passes that find and rewrite regions are in :mod:`mstfx.passes`; these only fix the
order Inductor gives to what the rewrite produced.
"""
