from freeal.cli import main

main()
