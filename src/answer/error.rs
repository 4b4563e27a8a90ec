//! The core's error: every failure a front end can meet, mapped to HTTP in one place
//! (`api::error`) and to a sentence of the user's language for the CLI.

use crate::engine::EngineError;
use crate::i18n::Msg;
use crate::msg;
use crate::rag::RagError;
use crate::scheduler::SchedulerError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[error("{}", self.msg())]
pub enum ServiceError {
    Store(#[from] StoreError),
    Scheduler(#[from] SchedulerError),
    Engine(#[from] EngineError),
    Rag(#[from] RagError),
    BadRequest(String),
    /// The named object (a stored response, say) does not exist.
    NotFound(String),
    /// As many answers as the engine batches plus `max_queue` are already in flight.
    Overloaded { in_flight: usize },
}

impl ServiceError {
    pub fn msg(&self) -> Msg {
        match self {
            ServiceError::Store(error) => error.msg(),
            ServiceError::Scheduler(SchedulerError::Load(error)) => error.msg(),
            ServiceError::Scheduler(SchedulerError::Busy { waiting }) => msg!("service.error.busy", waiting = waiting),
            ServiceError::Scheduler(SchedulerError::ShuttingDown) => msg!("service.error.shutting_down"),
            ServiceError::Engine(error) => error.msg(),
            ServiceError::Rag(error) => error.msg(),
            ServiceError::BadRequest(detail) => msg!("engine.error.bad_request", detail = detail),
            ServiceError::NotFound(detail) => msg!("engine.error.bad_request", detail = detail),
            ServiceError::Overloaded { in_flight } => msg!("service.error.overloaded", in_flight = in_flight),
        }
    }
}

pub type Result<T> = std::result::Result<T, ServiceError>;
