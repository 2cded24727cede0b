"""The cloud write-back cache: read-through, write-back, point-in-time epochs shipped on-prem.

See :mod:`.store` and :mod:`.journal` for the on-disk format, :mod:`.disk` for
the read and write paths, :mod:`.shipping` for epochs, :mod:`.cache` for the
component's orders and status, :mod:`.sizing` for the sizing rule.
"""
