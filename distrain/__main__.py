from distrain.cli import main

main()
