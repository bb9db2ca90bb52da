"""What several test modules share: the tiny training setup, run helpers, config builders."""
