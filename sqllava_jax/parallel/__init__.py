"""Device mesh, logical axis rules, multi-host set-up."""
