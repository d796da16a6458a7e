"""Stage functions shipped with mpipe (allowed by default in ``allowed_modules``)."""
