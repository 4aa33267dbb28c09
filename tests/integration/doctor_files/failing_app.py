"""An app whose import fails."""
raise ImportError("cannot import name 'settings'")
