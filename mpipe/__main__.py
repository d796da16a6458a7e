from mpipe.cli import main

main()
