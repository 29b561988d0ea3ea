"""Developer tools: the `audio-analysis` command line, the Python client of the job API and the
local launcher (Redis, API, worker, Flower without Docker)."""
