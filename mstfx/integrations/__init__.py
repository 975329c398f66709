"""Integrations with training libraries.  Each submodule imports its library only when imported itself
(``import mstfx`` never imports them): ``mstfx.integrations.trl`` for TRL."""
