from rlhf_env.default_task.build import main

raise SystemExit(main())
