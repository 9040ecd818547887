# Deployment shortcuts. The compose targets need a Docker engine; the rest run anywhere.
PYTHON ?= python
COMPOSE ?= docker compose
PROFILES ?=

.PHONY: compose-up compose-up-gpu compose-down compose-clean compose-logs compose-test deploy-test keys

## compose-up: build the images and start the stack, waiting until every service is up/healthy
compose-up:
	$(COMPOSE) $(PROFILES) up -d --build --wait

## compose-up-gpu: the same plus the GPU worker (needs the NVIDIA container toolkit)
compose-up-gpu:
	$(COMPOSE) --profile gpu up -d --build --wait

## compose-down: stop the stack, keep the volumes (database, queue, objects)
compose-down:
	$(COMPOSE) --profile gpu down

## compose-clean: stop the stack and delete its volumes
compose-clean:
	$(COMPOSE) --profile gpu down -v

compose-logs:
	$(COMPOSE) logs -f --tail=100

## keys: create an API key for tenant $(TENANT) in the running stack
TENANT ?= default
keys:
	$(COMPOSE) exec -T api ldmq keys create --tenant $(TENANT)

## compose-test: the end-to-end test against a fresh stack of its own (skips without a Docker engine)
compose-test:
	$(PYTHON) -m pytest -m compose tests/deploy

## deploy-test: the static checks of docker-compose.yml, the Dockerfiles and deploy/k8s
deploy-test:
	$(PYTHON) -m pytest -m "not compose" tests/deploy
