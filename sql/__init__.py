"""The numbered migrations, shipped inside the package as `service.sql` (see pyproject.toml)."""
