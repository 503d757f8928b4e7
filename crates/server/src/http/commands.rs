//! The wire's request bodies turned into the service's commands: the one place where an HTTP shape
//! meets the domain, so the service never sees a wire type and each handler stays one call long.

use tether_api as api;

use crate::service::agents::{AgentChanges, NewAgent};
use crate::service::environments::{EnvironmentChanges, NewEnvironment};
use crate::service::sessions::{NewSession, SessionChanges};
use crate::service::tokens::NewCredential;

impl From<api::CreateEnvironment> for NewEnvironment {
    fn from(request: api::CreateEnvironment) -> Self {
        NewEnvironment {
            name: request.name,
            description: request.description,
            config: Some(request.config).filter(|c| !c.is_null()),
            metadata: request.metadata,
            scope: request.scope,
        }
    }
}

impl From<api::UpdateEnvironment> for EnvironmentChanges {
    fn from(request: api::UpdateEnvironment) -> Self {
        EnvironmentChanges {
            name: request.name,
            description: request.description,
            config: request.config,
            metadata: request.metadata,
        }
    }
}

impl From<api::CreateCredential> for NewCredential {
    fn from(request: api::CreateCredential) -> Self {
        NewCredential { name: request.name }
    }
}

impl From<api::CreateAgent> for NewAgent {
    fn from(request: api::CreateAgent) -> Self {
        NewAgent {
            name: request.name,
            model: Some(request.model).filter(|m| !m.is_null()),
            description: request.description,
            system: request.system,
            tools: request.tools,
            skills: request.skills,
            mcp_servers: request.mcp_servers,
            execution_identity: request.execution_identity.filter(|i| !i.is_null()),
            metadata: request.metadata,
        }
    }
}

impl From<api::UpdateAgent> for AgentChanges {
    fn from(request: api::UpdateAgent) -> Self {
        AgentChanges {
            version: request.version,
            name: request.name,
            model: request.model.filter(|m| !m.is_null()),
            description: request.description,
            system: request.system,
            tools: request.tools,
            skills: request.skills,
            mcp_servers: request.mcp_servers,
            // A `null` sent removes the identity; absence leaves it.
            execution_identity: request
                .execution_identity
                .map(|i| Some(i).filter(|i| !i.is_null())),
            metadata: request.metadata,
        }
    }
}

impl From<api::CreateSession> for NewSession {
    fn from(request: api::CreateSession) -> Self {
        let (agent, agent_version) = match request.agent {
            api::AgentRef::Id(id) => (id, None),
            api::AgentRef::Version { id, version } => (id, Some(version)),
        };
        NewSession {
            environment_id: request.environment_id,
            agent,
            agent_version,
            title: request.title,
            metadata: request.metadata,
            environment_variables: request.environment_variables,
            resources: request.resources.unwrap_or_default(),
            budget: request.budget,
            initial_events: request.initial_events,
        }
    }
}

impl From<api::UpdateSession> for SessionChanges {
    fn from(request: api::UpdateSession) -> Self {
        SessionChanges {
            title: request.title,
            metadata: request.metadata,
        }
    }
}
