"""`python -m infra.embedded.demo` (`make demo`)."""

from infra.embedded.demo import main

main()
