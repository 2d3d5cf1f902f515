"""Background jobs: the job record and its schedule (pure), Standard Webhooks signatures, the SQLite and Redis stores, the runner, its HTTP calls and the jobs API."""
