from infra.demo import main

main()
