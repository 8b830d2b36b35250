"""sandboxd: process sandboxes as trio actors over an event-sourced log."""

__version__ = "0.1.0"
